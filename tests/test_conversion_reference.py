"""fst's conversions against each framework's own, live and bit for bit.

Every conversion mode of fst._core.convert follows one reference:
  "torch"          the installed torch's CPU tensor.to() when that is torch 2.13 (F8_E4M3
                   overflow saturates);
  "torch-fp8-nan"  torch 2.11 and earlier (F8_E4M3 overflow is NaN), checked against
                   tests/data/torch_2_11_f8_e4m3.json;
  "numpy"          a.astype(d), numpy's own for F16/F32/F64 and ml_dtypes' for BF16 and F8;
  "jax"            jnp.asarray(a).astype(d) on the CPU backend (x64 enabled for F64).

Exhaustive for 8- and 16-bit sources; for F32/F64 sources, NaN payloads, infinities, overflow,
ties (single against double rounding) and subnormals.

Run as a script (python tests/test_conversion_reference.py) it prints where the references
differ from one another: the enumeration behind the modes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch

from fst import _core
from fst.adapters.torch import conversion_mode

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"]
NUMPY = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
}
TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
TORCH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
PAIRS = [(s, d) for s, d in itertools.permutations(FLOATS, 2) if _core.conversion_supported(s, d)]
DATA = Path(__file__).parent / "data"


def size(d: str) -> int:
    return np.dtype(NUMPY[d]).itemsize


# ---- the references, on raw bits ------------------------------------------------------------

def torch_to(bits: np.ndarray, s: str, d: str) -> np.ndarray:
    t = torch.from_numpy(bits.copy()).view(TORCH_INT[size(s)]).view(TORCH[s]).to(TORCH[d])
    return t.view(TORCH_INT[size(d)]).numpy().view(UINT[size(d)])


def numpy_astype(bits: np.ndarray, s: str, d: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return bits.view(NUMPY[s]).astype(NUMPY[d]).view(UINT[size(d)])


def jax_astype(bits: np.ndarray, s: str, d: str) -> np.ndarray:
    with jax.enable_x64(True):
        out = jnp.asarray(bits.view(NUMPY[s]), device=jax.devices("cpu")[0]).astype(NUMPY[d])
        return np.asarray(out).view(UINT[size(d)])


REFERENCES = {"torch": torch_to, "numpy": numpy_astype, "jax": jax_astype}


# torch's scalar (non-x86-vector) conversion code gives other NaN payloads: exact NaN bits are
# torch's only where its AVX2/AVX512 code runs, as in tests/test_convert_host.py.
STRICT_TORCH_NAN = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def fst_convert(bits: np.ndarray, s: str, d: str, mode: str) -> np.ndarray:
    return np.frombuffer(_core.convert(bits.tobytes(), s, d, mode=mode), dtype=UINT[size(d)])


# ---- inputs ---------------------------------------------------------------------------------

def _with_signs(values, sign):
    return values + [v | sign for v in values]


F32_SPECIALS = _with_signs([
    0x7F800000, 0x7F800001, 0x7FC00000, 0x7FC00001, 0x7FBFFFFF, 0x7F812345, 0x7FE00000, 0x7F802000,
    0x7FFF0000, 0x7F810000, 0x7FC10000, 0x7FFFFFFF,                      # infinity, NaN payloads
    0x43E00000, 0x43E80000, 0x43E80001, 0x43F00000, 0x477FE000, 0x477FF000, 0x47700000,
    0x47600000, 0x477FEFFF, 0x7F7FFFFF, 0x7F000000,                      # F8/F16 overflow edges
    0x3F808000, 0x3F818000, 0x3F808001, 0x3F880000, 0x3F900000, 0x3F880001, 0x3F7FFFFF,  # ties
    0x00000001, 0x007FFFFF, 0x00400000, 0x00800000, 0x33000000, 0x33000001, 0x38800000,
    0x387FFFFF, 0x3A800000, 0x3B000000, 0x37000000, 0x37800000, 0x3F800000, 0x00000000,  # small
], 0x80000000)

F64_SPECIALS = _with_signs([
    0x7FF0000000000000, 0x7FF0000000000001, 0x7FF8000000000000, 0x7FF8000000000001, 0x7FF4000000000000,
    0x7FF0000020000000, 0x7FF0000010000000, 0x7FF7FFFFFFFFFFFF, 0x7FFFFFFFFFFFFFFF,  # NaN payloads
    0x3FF0000010000000, 0x3FF0000010000001, 0x3FF0000030000000,                      # F32 ties
    0x3FF0020000000000, 0x3FF0020000000001, 0x3FF0020000001000, 0x3FF0030000000000,  # F16 ties
    0x3FF0100000000000, 0x3FF0100000001000,                                          # BF16 ties
    0x3FF2000000000000, 0x3FF2000000001000, 0x3FF1000000000000, 0x3FF1000000001000,  # F8 ties
    0x0000000000000001, 0x000FFFFFFFFFFFFF, 0x3690000000000000, 0x3690000000000001,
    0x36A0000000000000, 0x380FFFFFFFFFFFFF, 0x3810000000000000, 0x3800000000000000,
    0x37F0000000000000, 0x36B0000000000000, 0x3E70000000000000, 0x3E70000000000001,
    0x3E68000000000000, 0x3E68000000000001,                                          # small
    0x47EFFFFFE0000000, 0x47EFFFFFEFFFFFFF, 0x47EFFFFFF0000000, 0x7FEFFFFFFFFFFFFF,
    0x40EFFC0000000000, 0x40EFFE0000000000, 0x40EFFDFFFFFFFFFF, 0x40EFFE0000000001,
    0x407C000000000000, 0x407D000000000000, 0x407D000000000001, 0x407E000000000000,  # overflow
    0x3FF0000000000000, 0x0000000000000000,
], 0x8000000000000000)


def source_bits(s: str) -> np.ndarray:
    """Every bit pattern of an 8- or 16-bit dtype; the special values of F32 and F64."""
    if s == "F32":
        return np.array(F32_SPECIALS, dtype=np.uint32)
    if s == "F64":
        return np.array(F64_SPECIALS, dtype=np.uint64)
    return np.arange(1 << (8 * size(s)), dtype=np.uint64).astype(UINT[size(s)])


def mismatches(got: np.ndarray, want: np.ndarray, src: np.ndarray) -> list[str]:
    bad = np.nonzero(got != want)[0]
    return [f"{int(src[i]):#x}: fst {int(got[i]):#x}, reference {int(want[i]):#x}" for i in bad[:8]] + (
        [f"... {len(bad)} in all"] if len(bad) > 8 else [])


# ---- the live references --------------------------------------------------------------------

@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "%s-%s" % p)
@pytest.mark.parametrize("framework", ["torch", "numpy", "jax"])
def test_mode_matches_its_framework(framework, pair):
    s, d = pair
    mode = conversion_mode() if framework == "torch" else framework
    src = source_bits(s)
    want = REFERENCES[framework](src, s, d)
    got = fst_convert(src, s, d, mode)
    if framework == "torch" and not STRICT_TORCH_NAN:
        nan = np.isnan(want.view(NUMPY[d]).astype(np.float64))
        assert np.array_equal(np.isnan(got.view(NUMPY[d]).astype(np.float64)), nan)
        got, want = got[~nan], want[~nan]
        src = src[~nan]
    assert not mismatches(got, want, src), f"{framework} {s}->{d}: " + "; ".join(mismatches(got, want, src))


def test_installed_torch_is_detected():
    """The probe's answer for the releases whose F8_E4M3 rule is known: 2.13 saturates, 2.11
    and earlier make overflow NaN (test_mode_matches_its_framework checks the rest)."""
    release = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    if release >= (2, 13):
        assert conversion_mode() == "torch"
    elif release <= (2, 11):
        assert conversion_mode() == "torch-fp8-nan"
    else:
        assert conversion_mode() in ("torch", "torch-fp8-nan")


def test_torch_2_11_table():
    """torch 2.11's F8_E4M3 rules, which the installed torch (2.13) no longer follows."""
    table = json.loads((DATA / "torch_2_11_f8_e4m3.json").read_text())
    assert table["torch"] == "2.11"
    for case in table["cases"]:
        s = case["from"]
        src = np.array([int(x, 16) for x in case["bits"]], dtype=UINT[size(s)])
        want = np.array([int(x, 16) for x in case["expected"]], dtype=np.uint8)
        got = fst_convert(src, s, "F8_E4M3", "torch-fp8-nan")
        assert not mismatches(got, want, src), f"{s}->F8_E4M3: " + "; ".join(mismatches(got, want, src))
        # The same inputs under torch 2.13's rules: only the overflows differ.
        now = fst_convert(src, s, "F8_E4M3", "torch")
        changed = {int(src[i]) for i in np.nonzero(now != got)[0]}
        assert changed == {int(x, 16) for x in case["overflow"]}, s


@pytest.mark.parametrize("mode", _core.CONVERT_MODES)
def test_vector_loops_agree_with_the_portable_ones(mode, monkeypatch):
    """The SIMD loops (F16C, AVX2) that the torch modes share must not leak into other modes."""
    for s, d in PAIRS:
        src = source_bits(s)
        src = np.tile(src, max(1, 4096 // len(src)))  # long enough for every vector loop
        fast = fst_convert(src, s, d, mode)
        monkeypatch.setenv("FST_CONVERT_BASELINE", "1")
        slow = fst_convert(src, s, d, mode)
        monkeypatch.delenv("FST_CONVERT_BASELINE")
        assert not mismatches(fast, slow, src), f"{mode} {s}->{d}"


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown conversion mode 'tf'"):
        _core.convert(b"\0\0", "F16", "F32", mode="tf")


# ---- the enumeration ------------------------------------------------------------------------

def differences() -> dict[tuple[str, str, str, str], int]:
    """(source, target, reference a, reference b) -> how many tested inputs they disagree on,
    over every pair both references convert."""
    out = {}
    for s, d in itertools.permutations(FLOATS, 2):
        src = source_bits(s)
        results = {}
        for name, f in REFERENCES.items():
            try:
                results[name] = f(src, s, d)
            except (TypeError, RuntimeError):  # a pair that reference does not convert
                continue
        for a, b in itertools.combinations(results, 2):
            n = int(np.count_nonzero(results[a] != results[b]))
            if n:
                out[(s, d, a, b)] = n
    return out


def test_the_references_differ_where_the_modes_say():
    """The enumeration's findings that the modes encode; a reference that changes shows here."""
    found = differences()
    # F8_E4M3 overflow: torch 2.13 saturates, numpy and JAX agree on NaN.
    assert found[("F16", "F8_E4M3", "torch", "numpy")] == found[("F16", "F8_E4M3", "torch", "jax")] > 0
    assert ("F16", "F8_E4M3", "numpy", "jax") not in found
    # F64 rounding: numpy rounds to F16 once, JAX to F8 once; everyone rounds to BF16 twice.
    tie = np.array([0x3FF0020000001000], dtype=np.uint64)
    assert numpy_astype(tie, "F64", "F16")[0] == 0x3C01 and torch_to(tie, "F64", "F16")[0] == 0x3C00
    assert jax_astype(tie, "F64", "F16")[0] == 0x3C00
    e4m3_tie = np.array([0x3FF1000000001000], dtype=np.uint64)
    assert jax_astype(e4m3_tie, "F64", "F8_E4M3")[0] == 0x39 and numpy_astype(e4m3_tie, "F64", "F8_E4M3")[0] == 0x38
    # JAX flushes F32 subnormals on the way to F64; torch and numpy agree there.
    assert found[("F32", "F64", "torch", "jax")] > 0 and ("F32", "F64", "torch", "numpy") not in found
    # Between F16 and F32 the references differ only on NaNs.
    nans = int(np.count_nonzero(np.isnan(source_bits("F16").view(np.float16))))
    assert found[("F16", "F32", "torch", "numpy")] <= nans and ("F16", "F32", "torch", "jax") not in found


if __name__ == "__main__":
    for (s, d, a, b), n in sorted(differences().items()):
        print(f"{s:8} -> {d:8} {a:5} vs {b:5}: {n} of {len(source_bits(s))}")
