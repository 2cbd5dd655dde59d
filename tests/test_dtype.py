"""dtype= conversion while loading: bit for bit what torch 2.13's tensor.to() gives (every
framework today), integers and BOOL as torch's .to() and numpy's astype both do them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fst
from fst import _core
from checkpoints import load_conversion, raw_bytes, write
from fst.adapters import get_adapter

FLOATS = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,
}


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    """Every float dtype with random bit patterns (NaNs, infinities, subnormals included)."""
    path = tmp_path_factory.mktemp("dtype") / "m.safetensors"
    tensors = [(d, d, [3, 1001]) for d in FLOATS + ["F8_E8M0"]] + [("ints", "I32", [17]), ("flag", "BOOL", [5])]
    return write(path, tensors, prefix=b"\x01")


@pytest.mark.parametrize("target", FLOATS)
@pytest.mark.parametrize("backend", ["auto", "pread"])
def test_every_float_to_every_float(floats, target, backend):
    # F8_E8M0 (exponent-only scales) converts to wider floats only.
    keys = None if target in ("F64", "F32", "F16", "BF16") else [n for n in FLOATS + ["ints", "flag"]]
    ref = fst.load(floats, framework="torch", backend="pread", keys=keys)
    got = fst.load(floats, framework="torch", dtype=target, backend=backend, keys=keys)
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        want = load_conversion(ref[name], TORCH[target]) if ref[name].is_floating_point() else ref[name]
        assert t.dtype == want.dtype, name
        assert raw_bytes(t) == raw_bytes(want), f"{name} -> {target}"
        if t.dtype != ref[name].dtype:  # converted: placed by fst
            assert t.data_ptr() % 64 == 0, name


def test_dtype_spellings_and_frameworks(floats):
    ref = fst.load(floats, framework="torch", keys=["BF16"])["BF16"].to(torch.float32)
    for spec in ("F32", "f32", "float32", "fp32", torch.float32, np.float32, np.dtype("float32")):
        got = fst.load(floats, framework="torch", keys=["BF16"], dtype=spec)["BF16"]
        assert raw_bytes(got) == raw_bytes(ref)
    assert raw_bytes(fst.load(floats, keys=["BF16"], dtype="f32")["BF16"]) == raw_bytes(ref)
    jax = pytest.importorskip("jax")
    arr = fst.load(floats, framework="jax", keys=["BF16"], dtype="f32")["BF16"]
    assert isinstance(arr, jax.Array) and raw_bytes(arr) == raw_bytes(ref)


def test_rules_by_pattern(floats):
    got = fst.load(floats, framework="torch", dtype={"F3*": "bf16", "F16": torch.float32})
    ref = fst.load(floats, framework="torch")
    assert got["F32"].dtype == torch.bfloat16 and got["F16"].dtype == torch.float32
    assert got["BF16"].dtype == torch.bfloat16 and got["ints"].dtype == torch.int32  # untouched
    assert raw_bytes(got["F32"]) == raw_bytes(ref["F32"].to(torch.bfloat16))


def test_streaming_and_safe_open_convert(floats):
    ref = fst.load(floats, framework="torch")
    streamed = dict(fst.iter_tensors(floats, framework="torch", dtype="f16", budget=5000))
    for name, t in streamed.items():
        want = ref[name].to(torch.float16) if ref[name].is_floating_point() else ref[name]
        assert raw_bytes(t) == raw_bytes(want), name
    with fst.safe_open(floats, "pt", dtype="f32") as f:
        assert raw_bytes(f.get_tensor("F8_E4M3")) == raw_bytes(ref["F8_E4M3"].to(torch.float32))
        assert raw_bytes(f.get_slice("BF16")[1:3, 5:9]) == raw_bytes(ref["BF16"][1:3, 5:9].to(torch.float32))


@pytest.mark.parametrize("buffer_bytes", [4096, 1 << 16])
def test_staged_loads_convert_in_the_pipeline(floats, buffer_bytes):
    """GPU loads convert where the raw bytes land (the kernels' batch tasks); checked here with
    the host copy engine, which runs the same tasks through the host twins, slowly, so a buffer
    reused too early would show."""
    ref = fst.load(floats, framework="torch")
    for target in ("F32", "BF16", "F8_E5M2"):
        keys = None if target != "F8_E5M2" else FLOATS + ["ints"]
        selection = fst.open_checkpoint(floats).select(keys).with_dtypes(target, [])
        options = _core.StagingOptions(threads=2, budget=4 * buffer_bytes, buffer_bytes=buffer_bytes)
        loaded = selection.start_staged(-1, options, sink=fst._core._testing.host_sink(copy_delay_us=20)).wait()
        assert loaded.casts == []
        got = get_adapter("torch").export(loaded, "cpu")
        for name, t in got.items():
            want = load_conversion(ref[name], TORCH[target]) if ref[name].is_floating_point() else ref[name]
            assert raw_bytes(t) == raw_bytes(want), f"{name} -> {target}"
            assert t.data_ptr() % 256 == 0


def test_framework_casts_when_the_device_cannot_convert(floats):
    """A device sink without kernels reports the conversions; the torch adapter applies them."""
    ref = fst.load(floats, framework="torch")
    selection = fst.open_checkpoint(floats).select(None).with_dtypes("F32", [])
    loaded = selection.start_staged(-1, _core.StagingOptions(threads=2, budget=1 << 20, buffer_bytes=1 << 16),
                                    sink=fst._core._testing.host_sink(converts=False)).wait()
    assert {i for i, _ in loaded.casts} and all(t == "F32" for _, t in loaded.casts)
    got = get_adapter("torch").export(loaded, "cpu")
    for name, t in got.items():
        want = ref[name].to(torch.float32) if ref[name].is_floating_point() else ref[name]
        assert raw_bytes(t) == raw_bytes(want), name


def test_conversion_errors(floats, tmp_path):
    with pytest.raises(fst.UnsupportedError, match="tensor 'ints': no conversion from I32 to F32"):
        fst.load(floats, dtype={"ints": "f32"})
    with pytest.raises(fst.UnsupportedError, match="tensor 'F32': no conversion from F32 to I32"):
        fst.load(floats, dtype={"F32": "int32"})
    with pytest.raises(fst.UnsupportedError, match="tensor 'flag': no conversion from BOOL to BF16"):
        fst.load(floats, framework="torch", dtype={"flag": torch.bfloat16})
    for name in ("complex128", "f8_e8m0", "float8_e8m0fnu"):  # F8_E8M0 is a source only
        with pytest.raises(ValueError, match="not a dtype"):
            fst.load(floats, dtype=name)
    f4 = write(tmp_path / "f4.safetensors", [("w", "F4", [2, 4])])
    with pytest.raises(fst.UnsupportedError, match="from F4"):
        fst.load(f4, framework="torch", dtype="bf16")


def test_numpy_refusals_suggest_torch_only_where_torch_helps(tmp_path):
    path = write(tmp_path / "sub.safetensors", [("f4", "F4", [2, 4]), ("f6", "F6_E2M3", [4, 4])])
    with pytest.raises(fst.UnsupportedError, match=r"F4 has no numpy dtype \(use framework='torch'\)"):
        fst.load(path, keys=["f4"])
    with pytest.raises(fst.UnsupportedError, match="F6_E2M3 has no numpy dtype") as err:
        fst.load(path, keys=["f6"])
    assert "framework=" not in str(err.value)


INTS = ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"]
NP_INT = {"BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
          "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64}
TORCH_INT = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16, "I16": torch.int16,
             "U32": torch.uint32, "I32": torch.int32, "U64": torch.uint64, "I64": torch.int64}


def _int_sources(name: str) -> np.ndarray:
    """Every bit pattern of the 8- and 16-bit types; edges and random ones of the wider."""
    width = np.dtype(NP_INT[name]).itemsize
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[width]
    if width <= 2:
        return np.arange(1 << (8 * width), dtype=np.uint64).astype(unsigned).view(NP_INT[name])
    bits = 8 * width
    edges = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000, (1 << (bits - 1)) - 1,
             1 << (bits - 1), (1 << bits) - 1, (1 << bits) - 2, 0x80000000 % (1 << bits), 0xFFFFFFFF % (1 << bits)]
    rand = np.random.default_rng(5).integers(0, 1 << 63, 5000, dtype=np.uint64).astype(unsigned)
    return np.concatenate([np.array(edges, dtype=np.uint64).astype(unsigned), rand]).view(NP_INT[name])


@pytest.mark.parametrize("src", INTS)
def test_integer_and_bool_conversions_match_torch_and_numpy(src):
    """Wraparound and bool = nonzero, as torch's .to() and numpy's astype do them (which agree),
    in every mode; BOOL bytes other than 0 and 1 included."""
    values = _int_sources(src)
    raw = values.view(np.uint8).tobytes()
    for dst in INTS:
        if dst == src:
            continue
        want_np = values.astype(NP_INT[dst]).view(np.uint8).tobytes()
        tv = torch.from_numpy(values.view(np.uint8).copy()).view(TORCH_INT[src])
        want_torch = tv.to(TORCH_INT[dst]).view(torch.uint8).numpy().tobytes()
        for mode in fst._core.CONVERT_MODES:
            got = bytes(fst._core.convert(raw, src, dst, mode=mode))
            assert got == want_torch, f"{mode} {src}->{dst} (torch)"
            assert got == want_np, f"{mode} {src}->{dst} (numpy)"


def test_integer_targets_while_loading(tmp_path):
    path = write(tmp_path / "ints.safetensors", [("a", "I32", [1000]), ("b", "BOOL", [77]), ("c", "U8", [300])],
                 prefix=b"\x05")
    rules = {"a": "i8", "b": "int64", "c": np.bool_}
    ref_t = fst.load(path, framework="torch")
    got_t = fst.load(path, framework="torch", dtype=rules)
    for name, target in (("a", torch.int8), ("b", torch.int64), ("c", torch.bool)):
        assert got_t[name].dtype == target
        assert raw_bytes(got_t[name]) == raw_bytes(ref_t[name].to(target)), name
    ref_n = fst.load(path)
    got_n = fst.load(path, dtype=rules)
    for name, target in (("a", np.int8), ("b", np.int64), ("c", np.bool_)):
        assert got_n[name].dtype == target
        assert raw_bytes(got_n[name]) == raw_bytes(ref_n[name].astype(target)), name
    # Integers change only when a rule names them: a bare target is for floating tensors.
    assert {t.dtype for t in fst.load(path, framework="torch", dtype="i64").values()} == {
        torch.int32, torch.bool, torch.uint8}


def test_dtype_with_sharded_jax_loads(floats):
    jax = pytest.importorskip("jax")
    mesh = jax.make_mesh((1,), ("x",))
    sharding = {"*": jax.sharding.PartitionSpec("x")}
    ref = fst.load(floats, framework="torch", keys=["BF16", "F16", "ints"])
    from fst._core import _testing

    before = _testing.headers_read()
    got = fst.load(floats, framework="jax", mesh=mesh, sharding=sharding, dtype="f32", keys=["BF16", "F16", "ints"])
    assert _testing.headers_read() - before == 1, "the sharded load parsed its one header more than once"
    before = _testing.headers_read()
    streamed = dict(fst.iter_tensors(floats, framework="jax", mesh=mesh, sharding=sharding, dtype="f32",
                                     keys=["BF16", "F16", "ints"]))
    assert _testing.headers_read() - before == 1, "the sharded stream parsed its one header more than once"
    for out in (got, streamed):
        for name, arr in out.items():
            want = ref[name].to(torch.float32) if ref[name].is_floating_point() else ref[name]
            assert raw_bytes(arr) == raw_bytes(want), name
            expected = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
            assert arr.sharding.is_equivalent_to(expected, arr.ndim), name
