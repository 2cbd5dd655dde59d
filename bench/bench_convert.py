"""Dtype conversion throughput next to a plain copy of the same data: fst's host conversion
(fst._core.convert) or, with --device cuda, fst's conversion kernel on the GPU
(fst._core.convert_on_device) beside a device-to-device copy and torch's own cast.

    python bench/bench_convert.py [--mib 256] [--repeats 7] [--threads 0]
    python bench/bench_convert.py --device cuda [--mib 2048] [--repeats 7]

For each conversion, prints the median time over the repeats and two rates: GB/s of source
data converted, and GB/s of memory traffic (bytes read plus bytes written). The copy rows are
numpy copies (np.copyto between existing arrays) of the source size and of the destination
size; "vs copy" divides the conversion's traffic rate by the better of the two copy rates, so
1.0 means the conversion moves bytes as fast as memcpy. Conversions write into an existing
buffer (convert(..., out=buf)) like the copies do; the "new" column is the time of
convert() returning a fresh bytearray, which adds the first-touch page faults of the output.

On a GPU every figure is the median over --repeats samples of 20 back-to-back launches each;
the copy rows are torch copy_ between uint8 device tensors, "torch cast" is torch's copy_
between the two dtypes (what a framework-side cast costs), and "vs copy" is again the traffic
rate over the better copy rate (target: at least 0.8). The last row is the move (alignment)
kernel placing 1000 pieces of the source, at odd offsets, into 256-byte aligned slots.
"""

import argparse
import statistics
import time

import numpy as np

from fst import _core
from fst.adapters.numpy import numpy_dtype

def itemsize(dtype: str) -> int:
    return _core.dtype_bits(dtype) // 8


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
    n = nbytes // itemsize(dtype)
    if dtype == "F8_E8M0":
        return rng.integers(120, 135, n, dtype=np.uint8)
    values = rng.standard_normal(n, dtype=np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        values *= 64
    uint = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize(dtype)]
    return values.astype(numpy_dtype(dtype)).view(uint)


DEVICE_PAIRS = [("BF16", "F32"), ("F32", "BF16"), ("BF16", "F16"), ("BF16", "F8_E4M3"), ("F8_E4M3", "BF16")]
INNER = 20  # launches per timed sample on the GPU


def device_bench(device: str, pairs, nbytes: int, repeats: int) -> None:
    import torch

    from fst.adapters.torch import TORCH_DTYPES

    dev = torch.device(device)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    dev = torch.device("cuda", index)
    rng = np.random.default_rng(0)

    def timed(fn):
        def sample():
            for _ in range(INNER):
                fn()
            torch.cuda.synchronize(dev)
        return median_seconds(sample, repeats) / INNER

    print(f"GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    print(f"{'what':<26}{'ms':>9}{'traffic GB/s':>14}{'vs copy':>9}")
    copies = {}

    def copy_rate(size):
        if size not in copies:
            a = torch.ones(size, dtype=torch.uint8, device=dev)
            b = torch.empty_like(a)
            t = timed(lambda: b.copy_(a))
            copies[size] = 2 * size / t / 1e9
            print(f"{'copy ' + str(size >> 20) + ' MiB':<26}{t * 1e3:9.3f}{copies[size]:14.1f}{1.0:9.2f}")
        return copies[size]

    def one_pair(src, dst):
        data = torch.from_numpy(source_data(src, nbytes, rng)).to(dev)
        count = data.numel()
        out_bytes = count * itemsize(dst)
        ref = max(copy_rate(data.numel() * data.element_size()), copy_rate(out_bytes))
        out = torch.empty(out_bytes, dtype=torch.uint8, device=dev)
        traffic = data.numel() * data.element_size() + out_bytes

        def fst_kernel():
            _core.convert_on_device(index, data.data_ptr(), src, out.data_ptr(), dst, count, INNER)

        t = median_seconds(fst_kernel, repeats) / INNER
        print(f"{'fst ' + src + ' -> ' + dst:<26}{t * 1e3:9.3f}{traffic / t / 1e9:14.1f}{traffic / t / 1e9 / ref:9.2f}")
        typed_src = data.view(TORCH_DTYPES[src])
        typed_out = out.view(TORCH_DTYPES[dst])
        t = timed(lambda: typed_out.copy_(typed_src))
        print(f"{'torch cast ' + src + ' -> ' + dst:<26}{t * 1e3:9.3f}{traffic / t / 1e9:14.1f}"
              f"{traffic / t / 1e9 / ref:9.2f}")

    for src, dst in pairs:
        one_pair(src, dst)
        torch.cuda.empty_cache()

    # The move kernel that places GDS reads in aligned slots: the source cut into 1000 pieces
    # at odd offsets, each moved to a 256-byte aligned slot, all in one launch.
    size = nbytes
    src = torch.ones(size, dtype=torch.uint8, device=dev)
    piece = (size // 1000) - 1
    out = torch.empty(1000 * (-(-piece // 256) * 256), dtype=torch.uint8, device=dev)
    moves = [(src.data_ptr() + 1 + i * (piece + 1), out.data_ptr() + i * (-(-piece // 256) * 256), piece)
             for i in range(1000)]
    moved = 1000 * piece
    ref = copy_rate(moved)

    def fst_move():
        _core.move_on_device(index, moves, INNER)

    t = median_seconds(fst_move, repeats) / INNER
    print(f"{'fst move, 1000 tensors':<26}{t * 1e3:9.3f}{2 * moved / t / 1e9:14.1f}{2 * moved / t / 1e9 / ref:9.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="source size per conversion (MiB)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="0: all hardware threads")
    ap.add_argument("--pairs", nargs="*", default=None, help="e.g. BF16:F32 F32:F16")
    ap.add_argument("--device", default="cpu", help="cpu (host conversion) or cuda[:N] (the GPU kernel)")
    args = ap.parse_args()
    if args.device != "cpu":
        pairs = DEVICE_PAIRS if not args.pairs else [tuple(p.split(":")) for p in args.pairs]
        device_bench(args.device, pairs, args.mib << 20, args.repeats)
        return
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
        out_bytes = data.size * itemsize(dst)
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
