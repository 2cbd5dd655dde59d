"""Host dtype conversion throughput (fst._core.convert) next to a plain copy of the same data.

    python bench/bench_convert.py [--mib 256] [--repeats 7] [--threads 0]

For each conversion, prints the median time over the repeats and two rates: GB/s of source
data converted, and GB/s of memory traffic (bytes read plus bytes written). The copy rows are
numpy copies (np.copyto between existing arrays) of the source size and of the destination
size; "vs copy" divides the conversion's traffic rate by the better of the two copy rates, so
1.0 means the conversion moves bytes as fast as memcpy. Conversions write into an existing
buffer (convert(..., out=buf)) like the copies do; the "new" column is the time of
convert() returning a fresh bytearray, which adds the first-touch page faults of the output.
"""

import argparse
import statistics
import time

import ml_dtypes
import numpy as np

from fst import _core

SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
DEFAULT_PAIRS = [("BF16", "F32"), ("F32", "BF16"), ("BF16", "F16"), ("F8_E4M3", "BF16")]


def median_seconds(fn, repeats):
    fn()  # warm up: page faults, thread start
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def source_data(dtype, nbytes, rng):
    """Weight-like data: normally distributed values (powers of two around 1 for E8M0)."""
    n = nbytes // SIZE[dtype]
    if dtype == "F8_E8M0":
        return rng.integers(120, 135, n, dtype=np.uint8)
    values = rng.standard_normal(n, dtype=np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        values *= 64
    np_type = {
        "F64": np.float64,
        "F32": np.float32,
        "F16": np.float16,
        "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn,
        "F8_E5M2": ml_dtypes.float8_e5m2,
    }[dtype]
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[SIZE[dtype]]
    return values.astype(np_type).view(uint)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="source size per conversion (MiB)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="0: all hardware threads")
    ap.add_argument("--pairs", nargs="*", default=None, help="e.g. BF16:F32 F32:F16")
    args = ap.parse_args()
    pairs = DEFAULT_PAIRS if not args.pairs else [tuple(p.split(":")) for p in args.pairs]
    rng = np.random.default_rng(0)
    nbytes = args.mib << 20

    print(f"{'what':<22}{'ms':>9}{'src GB/s':>10}{'traffic GB/s':>14}{'vs copy':>9}"
          f"{'new ms':>9}")
    copies = {}

    def copy_rate(size):
        if size not in copies:
            a = np.ones(size, dtype=np.uint8)
            b = np.empty_like(a)
            t = median_seconds(lambda: np.copyto(b, a), args.repeats)
            copies[size] = (t, 2 * size / t / 1e9)
            print(f"{'copy ' + str(size >> 20) + ' MiB':<22}{t * 1e3:9.1f}{size / t / 1e9:10.2f}"
                  f"{copies[size][1]:14.2f}{1.0:9.2f}")
        return copies[size][1]

    for src, dst in pairs:
        data = source_data(src, nbytes, rng)
        out_bytes = data.size * SIZE[dst]
        ref = max(copy_rate(data.nbytes), copy_rate(out_bytes))
        out = np.ones(out_bytes, dtype=np.uint8)
        t = median_seconds(lambda: _core.convert(data, src, dst, args.threads, out),
                           args.repeats)
        t_new = median_seconds(lambda: _core.convert(data, src, dst, args.threads),
                               max(1, args.repeats // 2))
        traffic = (data.nbytes + out_bytes) / t / 1e9
        print(f"{src + ' -> ' + dst:<22}{t * 1e3:9.1f}{data.nbytes / t / 1e9:10.2f}"
              f"{traffic:14.2f}{traffic / ref:9.2f}{t_new * 1e3:9.1f}")


if __name__ == "__main__":
    main()
