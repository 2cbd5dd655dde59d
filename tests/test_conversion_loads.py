"""dtype= converts as the target framework itself would: fst.load, iter_tensors and safe_open
give, bit for bit, what loading and then converting in that framework gives (numpy's astype,
jnp's astype, the installed torch's .to()), on the pairs where those references differ."""

from __future__ import annotations

import numpy as np
import pytest

import fst
from checkpoints import write_raw
from test_conversion_reference import NUMPY, REFERENCES, STRICT_TORCH_NAN, UINT, size, source_bits

# Pairs whose results differ between the references (NaN payloads, F8_E4M3 overflow, the
# rounding of F64): every 8- and 16-bit pattern, the special values of F32 and F64.
PAIRS = [("F16", "F8_E4M3"), ("BF16", "F8_E4M3"), ("F16", "BF16"), ("BF16", "F16"), ("F16", "F32"),
         ("F32", "BF16"), ("F8_E5M2", "F8_E4M3"), ("F64", "F16")]


def as_bits(x, d: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        import torch

        x = x.view(torch.uint8).numpy()
    return np.ascontiguousarray(np.asarray(x)).reshape(-1).view(np.uint8).view(UINT[size(d)])


def loads(path, framework: str, d: str) -> dict:
    rules = {"x": d.lower()}
    with fst.safe_open(path, framework, dtype=rules) as f:
        single = f.get_tensor("x")
    return {
        "load": fst.load(path, framework=framework, dtype=rules, backend="pread")["x"],
        "load views": fst.load(path, framework=framework, dtype=rules)["x"],
        "iter_tensors": dict(fst.iter_tensors(path, framework=framework, dtype=rules))["x"],
        "safe_open": single,
    }


@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: "%s-%s" % p)
def test_dtype_follows_the_framework(tmp_path, framework, pair):
    pytest.importorskip(framework)
    s, d = pair
    if framework == "jax" and "F64" in pair:
        pytest.skip("JAX without x64 holds no F64 arrays")
    bits = source_bits(s)
    path = write_raw(tmp_path / "x.safetensors", "x", s, [len(bits)], bits.tobytes())
    want = REFERENCES[framework](bits, s, d)
    for how, got in loads(path, framework, d).items():
        got = as_bits(got, d)
        bad = got != want
        if framework == "torch" and not STRICT_TORCH_NAN:
            nan = np.isnan(want.view(NUMPY[d]).astype(np.float32))
            bad &= ~(nan & np.isnan(got.view(NUMPY[d]).astype(np.float32)))
        assert not bad.any(), (how, [f"{int(b):#x}: fst {int(g):#x} want {int(w):#x}"
                                     for b, g, w in zip(bits[bad][:6], got[bad][:6], want[bad][:6])])
