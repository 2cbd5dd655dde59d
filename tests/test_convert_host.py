"""Host dtype conversion (fst._core.convert) against torch's CPU ``tensor.to()``, bit for bit, in
the conversion mode fst picks for the installed torch (tests/test_conversion_reference.py covers
the other modes and references).

Every bit pattern of the 8- and 16-bit float types is converted to every supported target;
F32 and F64 sources are covered with millions of random bit patterns, random values inside
each target's range, the special values, and the values at and around every rounding boundary
of every target (midpoints, the largest finite value, overflow thresholds, subnormals).

NaN bit patterns are compared exactly where torch runs its vectorised x86 conversion code
(AVX2/AVX512, what a contiguous ``tensor.to()`` uses there); torch's scalar code paths produce
other NaN payloads, so elsewhere NaNs only have to be NaNs.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

from fst import _core  # noqa: E402
from fst.adapters.torch import conversion_mode  # noqa: E402

FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
TORCH_DTYPE = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
SINT = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}  # what torch can view as
TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
TARGETS = {s: [d for d in FLOATS if d != s] for s in FLOATS}
TARGETS["F8_E8M0"] = ["F64", "F32", "F16", "BF16"]
PAIRS = [(s, d) for s in TARGETS for d in TARGETS[s]]
NARROWING = [(s, d) for s, d in PAIRS if s in ("F32", "F64") and SIZE[d] < SIZE[s]]

STRICT_NAN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# fst follows torch 2.13, where F8_E4M3 saturates to +-448 on overflow and infinity; earlier
# torch releases produced NaN there.
E4M3_SATURATES = torch.tensor([1000.0]).to(torch.float8_e4m3fn).view(torch.uint8).item() == 0x7E

RNG = np.random.default_rng(20240611)


@pytest.fixture(autouse=True, params=["dispatch", "baseline"])
def host_loops(request, monkeypatch):
    """Every test runs twice: with the loops chosen for this CPU (AVX2, F16C on x86) and with
    the portable ones (FST_CONVERT_BASELINE=1)."""
    if request.param == "baseline":
        monkeypatch.setenv("FST_CONVERT_BASELINE", "1")
    else:
        monkeypatch.delenv("FST_CONVERT_BASELINE", raising=False)
    return request.param


# ---- helpers ---------------------------------------------------------------------------------


def as_torch(bits: np.ndarray, dtype: str):
    size = SIZE[dtype]
    t = torch.from_numpy(np.ascontiguousarray(bits).view(SINT[size]))
    return t.view(TORCH_DTYPE[dtype])


def torch_convert(bits: np.ndarray, src: str, dst: str) -> np.ndarray:
    """torch's result for every element as its vectorised loop body produces it.

    torch finishes each thread's range with scalar code that gives some NaNs other bit
    patterns (F64->BF16: 0x7FC0 instead of 0xFFFF; F16->F32: 0x7FFFFFFF instead of a quiet
    NaN with the payload), so the reference runs on one thread over a length that the
    vector loop covers entirely.
    """
    n = bits.size
    padded = np.zeros(-(-n // 1024) * 1024, dtype=bits.dtype)
    padded[:n] = bits
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = as_torch(padded, src).to(TORCH_DTYPE[dst])
    finally:
        torch.set_num_threads(threads)
    return y.view(TORCH_INT[SIZE[dst]]).numpy().view(UINT[SIZE[dst]])[:n]


def fst_convert(bits: np.ndarray, src: str, dst: str, threads: int = 0) -> np.ndarray:
    out = _core.convert(np.ascontiguousarray(bits), src, dst, threads, mode=conversion_mode())
    assert isinstance(out, bytearray)
    assert len(out) == bits.size * SIZE[dst]
    return np.frombuffer(out, dtype=UINT[SIZE[dst]])


def is_nan(bits: np.ndarray, dtype: str) -> np.ndarray:
    return as_torch(bits, dtype).float().isnan().numpy()


def hexes(values) -> list:
    return [hex(int(v)) for v in values]


def check(bits: np.ndarray, src: str, dst: str) -> None:
    if dst == "F8_E4M3" and not E4M3_SATURATES:
        pytest.skip("this torch turns F8_E4M3 overflow into NaN; fst saturates like torch 2.13")
    bits = np.ascontiguousarray(bits, dtype=UINT[SIZE[src]])
    ref = torch_convert(bits, src, dst)
    got = fst_convert(bits, src, dst)
    if STRICT_NAN:
        bad = got != ref
    else:
        ref_nan = is_nan(ref, dst)
        bad = np.where(ref_nan, ~is_nan(got, dst), got != ref)
    if bad.any():
        idx = np.flatnonzero(bad)[:8]
        pytest.fail(
            f"{src}->{dst}: {int(bad.sum())} of {bits.size} differ; "
            f"src={hexes(bits[idx])} fst={hexes(got[idx])} torch={hexes(ref[idx])}"
        )


def all_patterns(dtype: str) -> np.ndarray:
    return np.arange(1 << (8 * SIZE[dtype]), dtype=np.uint64).astype(UINT[SIZE[dtype]])


def random_patterns(dtype: str, n: int) -> np.ndarray:
    return RNG.integers(0, np.iinfo(np.uint64).max, n, dtype=np.uint64, endpoint=True).astype(
        UINT[SIZE[dtype]]
    )


def as_float(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Values of `bits` (of `dtype`) as float64 (exact: every type here fits)."""
    return as_torch(bits, dtype).to(torch.float64).numpy()


def float_bits(values: np.ndarray, dtype: str) -> np.ndarray:
    np_type = np.float64 if dtype == "F64" else np.float32
    return np.asarray(values, dtype=np_type).view(UINT[SIZE[dtype]])


# ---- exhaustive over the narrow sources ------------------------------------------------------


@pytest.mark.parametrize(
    "src,dst", [(s, d) for s, d in PAIRS if SIZE[s] <= 2], ids=lambda v: str(v)
)
def test_every_bit_pattern(src, dst):
    check(all_patterns(src), src, dst)


# ---- F32 / F64 sources -----------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in PAIRS if SIZE[s] >= 4])
def test_random_bit_patterns(src, dst):
    check(random_patterns(src, 1 << 21), src, dst)


def special_values(src: str) -> np.ndarray:
    """Zeros, infinities, extremes and NaNs of every kind, as `src` bit patterns."""
    if src == "F32":
        sign, exp, quiet, mant_bits = 1 << 31, 0xFF << 23, 1 << 22, 23
    else:
        sign, exp, quiet, mant_bits = 1 << 63, 0x7FF << 52, 1 << 51, 52
    mant = (1 << mant_bits) - 1
    base = [
        0, exp, 1, 2, 3, mant, mant - 1, 1 << (mant_bits - 1),  # zero, inf, subnormals
        1 << mant_bits, (1 << mant_bits) | 1,  # smallest normals
        exp - 1, exp - 2,  # largest finite values
        exp | 1, exp | 2, exp | quiet, exp | quiet | 1, exp | mant, exp | (quiet >> 1),
        exp | (1 << (mant_bits - 10)), exp | (1 << (mant_bits - 11)),  # NaN payload edges
        exp | (1 << (mant_bits - 9)) | 1, exp | 0x5A5A5 << (mant_bits - 20),
    ]
    vals = base + [v | sign for v in base]
    return np.array(vals, dtype=UINT[SIZE[src]])


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in PAIRS if SIZE[s] >= 4])
def test_special_values(src, dst):
    check(special_values(src), src, dst)


def target_range_values(src: str, dst: str, n: int) -> np.ndarray:
    """Random `src` values whose magnitudes straddle the range of `dst`."""
    if dst == "F64":
        lo, hi = -1074, 1024
    elif dst == "F32":
        lo, hi = -149, 128
    else:
        pos = as_float(all_patterns(dst), dst)
        pos = pos[np.isfinite(pos) & (pos > 0)]
        lo, hi = int(np.floor(np.log2(pos.min()))), int(np.ceil(np.log2(pos.max())))
    exps = RNG.integers(lo - 4, hi + 3, n)
    mant = RNG.random(n) + 1.0
    with np.errstate(over="ignore"):
        vals = np.ldexp(mant, exps) * RNG.choice([-1.0, 1.0], n)
        if src == "F32":
            return vals.astype(np.float32).view(np.uint32)
    return vals.view(np.uint64)


@pytest.mark.parametrize("src,dst", [(s, d) for s, d in PAIRS if SIZE[s] >= 4])
def test_values_in_target_range(src, dst):
    check(target_range_values(src, dst, 1 << 19), src, dst)


def ulp32(x: np.ndarray) -> np.ndarray:
    """Spacing of the F32 values nearest to `x` (float64), 2^104 past the largest."""
    f = np.abs(x).astype(np.float32)
    up = np.nextafter(f, np.float32(np.inf)).astype(np.float64)
    return np.where(np.isinf(up), 2.0**104, up - f.astype(np.float64))


def boundary_values(src: str, dst: str) -> np.ndarray:
    """Every finite value of `dst`, the midpoints between neighbours (including the one past
    the largest finite value, i.e. the overflow threshold), and their nearest neighbours in
    the source precision (and, for F64 sources, in F32 precision, where torch's double
    rounding shows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if dst == "F32":
            # Too many values to enumerate: every binade edge and a few random mantissas.
            e = np.arange(-149, 128)
            m = np.concatenate([[1.0, 1.5, 2.0 - 2.0**-23, 1.0 + 2.0**-23], RNG.random(6) + 1.0])
            vals = np.ldexp(m[None, :], e[:, None]).ravel()
            grid = np.unique(vals.astype(np.float32).astype(np.float64))
            grid = np.concatenate([grid[np.isfinite(grid)], [np.finfo(np.float32).max]])
            u = ulp32(grid)
            pts = np.concatenate([grid, grid + u / 2, grid - u / 4, [2.0**-150, 3 * 2.0**-151]])
        else:
            pos = as_float(all_patterns(dst), dst)
            pos = np.unique(pos[np.isfinite(pos) & (pos >= 0)])
            top = pos[-1] + (pos[-1] - pos[-2])  # one step past the largest finite value
            grid = np.concatenate([pos, [top]])
            mids = (grid[:-1] + grid[1:]) / 2
            extra = [top * 1.5, top * 2, pos[-1] * 1.0625, pos[1] / 2, pos[1] / 4, pos[1] * 0.75]
            if dst == "F8_E4M3":
                extra += [464.0, 480.0, 496.0, 512.0]
            pts = np.concatenate([grid, mids, extra])
        pts = np.concatenate([pts, -pts])
        np_type = np.float32 if src == "F32" else np.float64
        base = pts.astype(np_type)
        neigh = [base, np.nextafter(base, np_type(np.inf)), np.nextafter(base, np_type(-np.inf))]
        if src == "F64":
            near32 = pts.astype(np.float32).astype(np.float64)
            u = ulp32(pts)
            neigh += [near32 + u / 4, near32 - u / 4, near32 + u / 2, near32 - u / 2]
        allv = np.concatenate([np.asarray(v, dtype=np_type) for v in neigh])
    return allv.view(UINT[SIZE[src]])


@pytest.mark.parametrize("src,dst", NARROWING)
def test_rounding_boundaries(src, dst):
    check(boundary_values(src, dst), src, dst)


def test_f64_double_rounding_matches_torch():
    # 1 + 2^-11 + 2^-40 is above the F16 midpoint, but rounds to the midpoint in F32 and from
    # there to even: torch goes through F32, and so do we.
    v = np.array([1.0 + 2.0**-11 + 2.0**-40, -(1.0 + 2.0**-11 + 2.0**-40)])
    got = fst_convert(v.view(np.uint64), "F64", "F16")
    assert hexes(got) == ["0x3c00", "0xbc00"]
    check(v.view(np.uint64), "F64", "F16")


# ---- cross-check against ml_dtypes (finite and infinite results) -----------------------------

ML = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn,
    "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": getattr(ml_dtypes, "float8_e8m0fnu", None),
}


@pytest.mark.parametrize(
    "src,dst", [(s, d) for s, d in PAIRS if SIZE[s] <= 2 and d in ML], ids=lambda v: str(v)
)
def test_non_nan_results_match_ml_dtypes(src, dst):
    if ML[src] is None:
        pytest.skip("ml_dtypes without float8_e8m0fnu")
    bits = all_patterns(src)
    got = fst_convert(bits, src, dst)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = bits.view(ML[src]).astype(np.float32).astype(ML[dst]).view(UINT[SIZE[dst]])
    keep = ~is_nan(ref, dst)
    bad = keep & (got != ref)
    assert not bad.any(), (hexes(bits[bad][:8]), hexes(got[bad][:8]), hexes(ref[bad][:8]))


# ---- copies, alignment, threads, errors ------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", ["BOOL", "U8", "F4", "F6_E2M3", "I16", "BF16", "F32", "C64", "U64", "F8_E8M0"]
)
def test_identity_is_a_copy(dtype):
    data = RNG.integers(0, 256, 4096 + 24, dtype=np.uint8)
    out = _core.convert(data, dtype, dtype)
    assert isinstance(out, bytearray) and bytes(out) == data.tobytes()


@pytest.mark.parametrize("src,dst", [("BF16", "F32"), ("F32", "F16"), ("F64", "F8_E4M3"),
                                     ("F8_E5M2", "F64")])
@pytest.mark.parametrize("offset", [1, 3])
def test_unaligned_source(src, dst, offset):
    bits = random_patterns(src, 5000)
    raw = bytearray(offset) + bytearray(bits.tobytes())
    view = memoryview(raw)[offset:]
    got = np.frombuffer(_core.convert(view, src, dst, 1, mode=conversion_mode()), dtype=UINT[SIZE[dst]])
    assert np.array_equal(got, fst_convert(bits, src, dst))


@pytest.mark.parametrize("threads", [0, 1, 2, 3, 7])
def test_threads_give_identical_results(threads):
    bits = random_patterns("F32", (3 << 20) + 17)  # 12 MiB: enough to be split
    ref = fst_convert(bits, "F32", "BF16", 1)
    assert np.array_equal(fst_convert(bits, "F32", "BF16", threads), ref)
    assert np.array_equal(ref, torch_convert(bits, "F32", "BF16"))


def test_empty_input():
    assert _core.convert(b"", "BF16", "F32") == bytearray()


def test_conversion_supported():
    for s, d in PAIRS:
        assert _core.conversion_supported(s, d)
    assert _core.conversion_supported("F4", "F4")
    assert not _core.conversion_supported("F32", "F8_E8M0")
    assert not _core.conversion_supported("F8_E8M0", "F8_E4M3")
    assert not _core.conversion_supported("I32", "F32")
    assert not _core.conversion_supported("F32", "I32")
    assert not _core.conversion_supported("BOOL", "F16")
    assert _core.conversion_supported("I64", "BOOL") and _core.conversion_supported("BOOL", "U16")
    with pytest.raises(ValueError):
        _core.conversion_supported("F33", "F32")


def test_errors():
    with pytest.raises(ValueError):
        _core.convert(b"\0\0", "bf16", "F32")  # names are case-sensitive
    with pytest.raises(ValueError):
        _core.convert(b"\0\0\0", "BF16", "F32")  # not whole elements
    with pytest.raises(ValueError):
        _core.convert(b"\0\0", "BF16", "F32", -1)
    with pytest.raises(Exception, match="not supported"):
        _core.convert(b"\0\0\0\0", "F32", "F8_E8M0")
    with pytest.raises(TypeError):
        _core.convert("not a buffer", "BF16", "F32")
