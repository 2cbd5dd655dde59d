"""fst.torch.load_into: a checkpoint written into existing parameters in place, bit for bit
what ``module.load_state_dict(safetensors.torch.load_file(path))`` writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")
import safetensors.torch  # noqa: E402

import fst  # noqa: E402
import fst.torch  # noqa: E402
from checkpoints import assert_same_bits, raw_bytes, write  # noqa: E402
from fst import _load_into  # noqa: E402
from fst.errors import UnsupportedError  # noqa: E402

CUDA = fst._core.cuda_driver_info()["available"] and torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

SHAPES = [(), (0,), (1,), (7,), (3, 5), (2, 3, 5), (33, 257), (0, 4)]
FLOATS = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
INTS = [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8]


class Buffers(torch.nn.Module):
    """A module whose state is the given tensors, as buffers named t0, t1, ..."""

    def __init__(self, tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)


def values(dtype, shape, seed):
    """Values worth converting: for floats, normal values with infinities, NaN, signed zero,
    overflow for the narrow types and subnormals; for integers, the dtype's whole range."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.Size(shape).numel())
    if dtype.is_floating_point:
        t = torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** torch.randint(-8, 6, (n,), generator=g)
        specials = torch.tensor([float("inf"), -float("inf"), float("nan"), -0.0, 1e5, 65519.0, 1e-40, 3.0e38])
        t[: min(n, len(specials))] = specials[: min(n, len(specials))].double()
        return t.to(dtype).reshape(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool().reshape(shape)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype).reshape(shape)


def garbage(dtype, shape):
    return torch.full(shape, 3, dtype=dtype)


def reference_load(module_or_tensors, path, strict=True):
    """What torch writes: load_state_dict of safetensors' tensors."""
    return module_or_tensors.load_state_dict(safetensors.torch.load_file(str(path)), strict=strict)


def assert_same_state(got, want):
    got, want = dict(got), dict(want)
    assert list(got) == list(want)
    for name in got:
        assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
        assert_same_bits(got[name], want[name], name)


def same(a, b) -> bool:
    """The same dtype, shape and bits (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and raw_bytes(a) == raw_bytes(b)


def save(path, tensors):
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


PAIRS = ([(d, d) for d in FLOATS + INTS + [torch.bool, torch.float8_e4m3fn, torch.float8_e5m2]]
         + [(a, b) for a in FLOATS for b in FLOATS if a != b]
         + [(a, b) for a in INTS for b in INTS if a != b]
         + [(torch.bool, torch.int32), (torch.int32, torch.bool), (torch.int64, torch.float32),
            (torch.bool, torch.float16), (torch.float32, torch.float8_e4m3fn), (torch.bfloat16, torch.float8_e5m2),
            (torch.float8_e4m3fn, torch.float32), (torch.float8_e5m2, torch.bfloat16)])


@pytest.mark.parametrize("budget", [None, 96], ids=["default-budget", "96-bytes"])
@pytest.mark.parametrize("src,dst", PAIRS, ids=lambda d: str(d).removeprefix("torch."))
def test_every_dtype_pair_and_shape_as_load_state_dict(tmp_path, src, dst, budget):
    tensors = {f"t{i}": values(src, s, i) for i, s in enumerate(SHAPES)}
    path = save(tmp_path / "m.safetensors", tensors)
    got = Buffers([garbage(dst, s) for s in SHAPES])
    want = Buffers([garbage(dst, s) for s in SHAPES])
    assert fst.torch.load_into(got, path, budget=budget) == ([], [])
    reference_load(want, path)
    assert_same_state(got.state_dict(), want.state_dict())


def test_every_bit_pattern_of_the_file_dtype_arrives(tmp_path):
    """Random bytes (NaN payloads, odd bools aside) into destinations of the file's dtype,
    contiguous (read straight in) and transposed (through the buffer)."""
    dtypes = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
              "U16": torch.uint16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    path = write(tmp_path / "m.safetensors", [(f"{d}.{i}", d, s) for d in dtypes for i, s in
                                             enumerate([(5,), (4, 9), (1, 1, 3)])], prefix=b"\x01\x02\x03")
    ref = safetensors.torch.load_file(str(path))
    ref.pop("__prefix__")
    state = {}
    for name, t in ref.items():
        if t.dim() == 2:  # a transposed view of storage of the transposed shape
            state[name] = torch.zeros(t.shape[::-1], dtype=t.dtype).t()
        else:
            state[name] = torch.zeros_like(t)
    missing, unexpected = fst.torch.load_into(state, path, strict=False)
    assert missing == [] and unexpected == ["__prefix__"]
    for name, t in ref.items():
        assert raw_bytes(state[name]) == raw_bytes(t), name


class Transposed(torch.nn.Module):
    """A linear layer whose weight is the transpose of its storage, beside a plain one."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(300, 40, dtype=dtype).t())  # (40, 300), strides (1, 40)
        self.plain = torch.nn.Parameter(torch.zeros(40, 300, dtype=dtype))


@pytest.mark.parametrize("budget", [None, 64, 4096], ids=["default-budget", "row-of-64-bytes", "4KiB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_non_contiguous_destinations(tmp_path, dtype, budget):
    path = save(tmp_path / "m.safetensors", {"weight": values(torch.float32, (40, 300), 0),
                                            "plain": values(torch.float32, (40, 300), 1)})
    got, want = Transposed(dtype), Transposed(dtype)
    storage = got.weight.data_ptr()
    assert fst.torch.load_into(got, path, budget=budget) == ([], [])
    reference_load(want, path)
    assert_same_state(got.state_dict(), want.state_dict())
    assert got.weight.data_ptr() == storage and got.weight.stride() == (1, 40)


def test_strided_views_in_a_state_dict(tmp_path):
    base = torch.zeros(6, 20, dtype=torch.float16)
    path = save(tmp_path / "m.safetensors", {"every_other": values(torch.float32, (6, 10), 0),
                                            "column": values(torch.float16, (6,), 1)})
    state = {"every_other": base[:, ::2], "column": base[:, 1]}
    fst.torch.load_into(state, path, budget=32)
    ref = safetensors.torch.load_file(str(path))
    assert_same_bits(base[:, ::2], ref["every_other"].to(torch.float16), "every_other")
    assert raw_bytes(base[:, 1]) == raw_bytes(ref["column"])
    assert same(base[:, 3::2], torch.zeros(6, 9, dtype=torch.float16))  # nothing else written


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10)
        self.head.weight = self.embed.weight


def test_tied_weights_stored_once_are_not_missing(tmp_path):
    src = Tied()
    safetensors.torch.save_model(src, str(tmp_path / "m.safetensors"))  # keeps one of the two names
    dst = Tied()
    assert fst.torch.load_into(dst, tmp_path / "m.safetensors") == ([], [])
    assert dst.head.weight is dst.embed.weight
    assert_same_state(dst.state_dict(), src.state_dict())


def test_tied_weights_stored_twice_last_wins_as_in_load_state_dict(tmp_path):
    path = save(tmp_path / "m.safetensors", {"embed.weight": torch.ones(10, 4), "head.weight": torch.full((10, 4), 2.0),
                                            "head.bias": torch.zeros(10)})
    got, want = Tied(), Tied()
    assert fst.torch.load_into(got, path) == ([], [])
    reference_load(want, path)
    assert_same_state(got.state_dict(), want.state_dict())


def test_a_genuinely_missing_name_is_reported(tmp_path):
    path = save(tmp_path / "m.safetensors", {"embed.weight": torch.ones(10, 4)})
    got = Tied()
    assert fst.torch.load_into(got, path, strict=False) == (["head.bias"], [])
    with pytest.raises(RuntimeError, match="missing keys: head.bias"):
        fst.torch.load_into(Tied(), path)


def two_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_strict_and_non_strict_names_as_load_state_dict(tmp_path):
    path = save(tmp_path / "m.safetensors", {"0.weight": values(torch.float32, (6, 8), 0),
                                            "1.bias": values(torch.float32, (4,), 1),
                                            "extra": values(torch.float32, (3,), 2)})
    got, want = two_layers(), two_layers()
    before = snapshot(got)
    with pytest.raises(RuntimeError, match=r"(?s)missing keys: 0.bias, 1.weight.*unexpected keys: extra"):
        fst.torch.load_into(got, path)
    assert_same_state(got.state_dict(), before)  # a refused load writes nothing

    result = fst.torch.load_into(got, path, strict=False)
    expected = reference_load(want, path, strict=False)
    assert result == (expected.missing_keys, expected.unexpected_keys)
    assert_same_state(got.state_dict(), want.state_dict())


def test_keys_select_what_is_loaded_and_what_strict_judges(tmp_path):
    path = save(tmp_path / "m.safetensors", {"0.weight": values(torch.float32, (6, 8), 0),
                                            "0.bias": values(torch.float32, (6,), 1),
                                            "extra": values(torch.float32, (3,), 2)})
    got = two_layers()
    before = snapshot(got)
    # "1.*" is missing from the file and "extra" unexpected, but neither is selected.
    assert fst.torch.load_into(got, path, keys="0.*") == ([], [])
    ref = safetensors.torch.load_file(str(path))
    assert same(got[0].weight, ref["0.weight"]) and same(got[0].bias, ref["0.bias"])
    assert same(got[1].weight, before["1.weight"]) and same(got[1].bias, before["1.bias"])

    got = two_layers()
    assert fst.torch.load_into(got, path, keys=["0.bias", "1.*"], strict=False) == (["1.weight", "1.bias"], [])
    assert same(got[0].bias, ref["0.bias"]) and same(got[0].weight, before["0.weight"])
    with pytest.raises(RuntimeError, match="missing keys: 1.weight, 1.bias"):
        fst.torch.load_into(two_layers(), path, keys=["0.bias", "1.*"])
    with pytest.raises(KeyError, match="nope"):
        fst.torch.load_into(two_layers(), path, keys=["nope"])


@pytest.mark.parametrize("strict", [True, False])
def test_a_shape_mismatch_raises_before_any_write(tmp_path, strict):
    # The mismatch is last in the file and in the model: everything before it would fit.
    path = save(tmp_path / "m.safetensors", {"0.weight": values(torch.float32, (6, 8), 0),
                                            "0.bias": values(torch.float32, (6,), 1),
                                            "1.weight": values(torch.float32, (4, 6), 2),
                                            "1.bias": values(torch.float32, (5,), 3)})
    got = two_layers().to(torch.float16)  # one destination read through the buffer, converted
    got[0].weight.data = torch.zeros(8, 6).t()  # and one transposed
    before = snapshot(got)
    with pytest.raises(RuntimeError, match=r"size mismatch for 1.bias: copying a param with shape "
                                           r"torch.Size\(\[5\]\) from checkpoint, the shape in current model is "
                                           r"torch.Size\(\[4\]\)"):
        fst.torch.load_into(got, path, strict=strict)
    assert_same_state(got.state_dict(), before)


def test_a_conversion_torch_cannot_do_is_refused_before_any_write(tmp_path):
    if not hasattr(torch, "float4_e2m1fn_x2"):
        pytest.skip("torch without float4_e2m1fn_x2")
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(3), "b": torch.ones(2, 4)})
    state = {"a": torch.zeros(3), "b": torch.zeros(2, 4, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    with pytest.raises(UnsupportedError, match="'b': torch does not convert torch.float32"):
        fst.torch.load_into(state, path)
    assert same(state["a"], torch.zeros(3))


def test_a_checkpoint_of_several_files(tmp_path):
    save(tmp_path / "model-00001-of-00002.safetensors", {"0.weight": values(torch.float32, (6, 8), 0),
                                                         "0.bias": values(torch.float32, (6,), 1)})
    save(tmp_path / "model-00002-of-00002.safetensors", {"1.weight": values(torch.float32, (4, 6), 2),
                                                         "1.bias": values(torch.float32, (4,), 3)})
    got, want = two_layers(), two_layers()
    assert fst.torch.load_into(got, tmp_path) == ([], [])
    for f in sorted(tmp_path.glob("*.safetensors")):
        want.load_state_dict(safetensors.torch.load_file(str(f)), strict=False)
    assert_same_state(got.state_dict(), want.state_dict())


def test_lazily_conjugated_and_sparse_destinations(tmp_path):
    path = save(tmp_path / "m.safetensors", {"c": torch.randn(5, dtype=torch.complex64), "s": torch.ones(2, 2)})
    got = {"c": torch.zeros(5, dtype=torch.complex64).conj()}  # its memory holds the conjugate
    want = {"c": torch.zeros(5, dtype=torch.complex64).conj()}
    fst.torch.load_into(got, path, strict=False)
    want["c"].copy_(safetensors.torch.load_file(str(path))["c"])
    assert got["c"].is_conj() and same(got["c"].resolve_conj(), want["c"].resolve_conj())
    with pytest.raises(UnsupportedError, match="'s' is a torch.sparse_coo tensor"):
        fst.torch.load_into({"s": torch.eye(2).to_sparse()}, path, keys="s")


def test_meta_tensors_are_refused_with_a_pointer_to_dcp(tmp_path):
    path = save(tmp_path / "m.safetensors", {"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    with torch.device("meta"):
        model = torch.nn.Linear(3, 2)
    with pytest.raises(UnsupportedError, match="meta tensor.*fst.dcp"):
        fst.torch.load_into(model, path)


def test_dtensors_are_refused_with_a_pointer_to_dcp(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    path = save(tmp_path / "m.safetensors", {"w": torch.ones(4)})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        state = {"w": distribute_tensor(torch.zeros(4), mesh, [Replicate()])}
        with pytest.raises(UnsupportedError, match="DTensor.*fst.dcp"):
            fst.torch.load_into(state, path)
        assert same(state["w"].to_local(), torch.zeros(4))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype,make", [
    (torch.float32, lambda: torch.zeros(40, 300)),  # read straight in
    (torch.float32, lambda: torch.zeros(300, 40).t()),  # copied from the buffer
    (torch.bfloat16, lambda: torch.zeros(40, 300, dtype=torch.bfloat16)),  # converted by fst from the buffer
], ids=["direct", "transposed", "converted"])
def test_writes_move_the_version_counter_of_leaf_parameters(tmp_path, dtype, make):
    path = save(tmp_path / "m.safetensors", {"p": values(torch.float32, (40, 300), 0)})
    p = torch.nn.Parameter(make())
    assert p.is_leaf and p.requires_grad
    y = (p * p).sum()  # saves p for backward
    version = p._version
    fst.torch.load_into({"p": p}, path)
    assert p._version > version
    assert p.is_leaf and p.requires_grad and p.grad_fn is None
    assert same(p.detach(), safetensors.torch.load_file(str(path))["p"].to(dtype))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()  # autograd sees that p changed after it was saved


def _drop_from_page_cache(path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "not-cached"])
def test_a_tensor_larger_than_the_budget_takes_pieces_of_the_budget(tmp_path, monkeypatch, cached):
    """What can be asserted in-process: a file in the page cache is converted or copied out of
    mappings of at most `budget` bytes and allocates nothing; one that is not goes through a
    buffer of at most `budget` bytes, the only memory load_into allocates, or, for the file's
    dtype, is read straight in."""
    path = save(tmp_path / "m.safetensors", {"big": values(torch.float32, (1 << 18,), 0),
                                            "small": values(torch.float32, (3,), 1)})
    # Copies: pages the reference maps cannot be dropped from the page cache.
    ref = {name: t.clone() for name, t in safetensors.torch.load_file(str(path)).items()}
    allocated, mapped = [], []
    real_empty, real_map = torch.empty, _load_into.mapped_span

    def spy_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        allocated.append(t.numel() * t.element_size())
        return t

    def spy_map(ckpt, file, offset, length, **kwargs):
        mapped.append(length)
        return real_map(ckpt, file, offset, length, **kwargs)

    monkeypatch.setattr(_load_into.torch, "empty", spy_empty)
    monkeypatch.setattr(_load_into, "mapped_span", spy_map)
    if not cached:
        _drop_from_page_cache(path)
    state = {"big": torch.zeros(1 << 18, dtype=torch.float64), "small": torch.zeros(3, dtype=torch.float16)}
    fst.torch.load_into(state, path, budget=4096)
    assert same(state["big"], ref["big"].double()) and same(state["small"], ref["small"].half())
    if cached:
        assert allocated == [] and len(mapped) > 2 and max(mapped) <= 4096
        assert "2 converted or copied out of the page cache" in fst.last_load_stats()["reason"]
    else:
        assert mapped == [] and allocated and max(allocated) <= 4096
        assert "2 through a 4096-byte buffer" in fst.last_load_stats()["reason"]

    # The file's dtype: copied out of mappings when cached, else read straight in.
    allocated.clear()
    mapped.clear()
    if not cached:
        _drop_from_page_cache(path)
    state = {"big": torch.zeros(1 << 18), "small": torch.zeros(3)}
    fst.torch.load_into(state, path, budget=4096)
    assert allocated == []
    assert (max(mapped) <= 4096) if cached else (mapped == [])
    assert same(state["big"], ref["big"]) and same(state["small"], ref["small"])


def test_a_file_rewritten_during_a_mapped_conversion_is_refused(tmp_path, monkeypatch):
    """Bytes converted out of a mapping of a file rewritten in place meanwhile are refused, as
    read_into refuses what it read."""
    import os

    from fst.errors import FstError

    path = save(tmp_path / "m.safetensors", {"w": values(torch.float32, (4096,), 0)})
    convert = _load_into._convert

    def rewrite_then_convert(src, out, mode):  # src: a view of the mapped span
        with open(path, "r+b") as f:
            f.seek(-64, os.SEEK_END)
            f.write(b"\xff" * 64)
        st = os.stat(path)  # a later mtime, whatever the file system's clock granularity
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        convert(src, out, mode)

    monkeypatch.setattr(_load_into, "_convert", rewrite_then_convert)
    with pytest.raises(FstError, match="m.safetensors.*changed since its header was read"):
        fst.torch.load_into({"w": torch.zeros(4096, dtype=torch.float64)}, path)


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "not-cached"])
def test_peak_memory_is_bounded_by_the_budget_not_the_model(tmp_path, cached):
    """In a fresh process: 64 MiB of bfloat16 into float32 parameters (every tensor converted
    out of mappings when the file is in the page cache, or through the buffer when it is not)
    with a 1 MiB budget raises the peak RSS by far less than a copy of the checkpoint."""
    path = save(tmp_path / "m.safetensors", {f"w{i}": torch.randn(2048, 2048).bfloat16() for i in range(8)})
    route = "8 converted or copied out of the page cache" if cached else "8 through a"
    # /proc/self/status, whose figures the kernel sums exactly (statm's, which psutil reads, may
    # be tens of MiB behind).
    code = textwrap.dedent(f"""
        import os, torch, fst, fst.torch

        def kib(field):
            return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

        state = {{f"w{{i}}": torch.ones(2048, 2048) for i in range(8)}}
        fst.torch.load_into({{}}, {str(path)!r}, strict=False, keys="nothing*")  # imports done
        if {not cached}:
            fd = os.open({str(path)!r}, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        before = kib("VmRSS")
        fst.torch.load_into(state, {str(path)!r}, budget=1 << 20)
        assert {route!r} in fst.last_load_stats()["reason"]
        print((kib("VmHWM") - before) >> 10)
    """)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    extra_mib = int(out.split()[-1])  # (an editable install may print its rebuild first)
    assert extra_mib <= 1 + 16, f"peak RSS rose by {extra_mib} MiB for a 64 MiB checkpoint and a 1 MiB budget"


@pytest.mark.parametrize("host_conversion", [False, True], ids=["copied", "converted-on-host"])
@pytest.mark.parametrize("capacity", [200, 1000, 1 << 20])
def test_groups_fit_the_buffer_and_cover_every_element_once(monkeypatch, capacity, host_conversion):
    """The plan of the buffered route, on its own: every group fits in the buffer without two
    pieces overlapping there, and the pieces of each destination (a view each) cover each of
    its elements once, at the element's place in the file's row-major order. With
    host_conversion, as for a CUDA destination of another dtype: room for the converted bytes."""
    if host_conversion:
        monkeypatch.setattr(_load_into, "_converted_on_host", lambda w: w.dest.element_size())
    dests = [torch.zeros(7, 300, dtype=torch.float64).t(),  # rows larger than the buffer
             torch.zeros(40, 3, 5, dtype=torch.float64)[:, 1],  # rows that fit
             torch.zeros(1000, dtype=torch.float64)[::3],
             torch.zeros((), dtype=torch.float64),
             torch.zeros(0, 5, dtype=torch.float64),
             torch.zeros(123, dtype=torch.float64)]
    writes = [_load_into._Write(f"d{i}", d, 0, 0, torch.float32) for i, d in enumerate(dests)]
    for group in _load_into._groups(writes, capacity):
        spans = []
        for w, piece, first, at, conv_at in group:
            n = piece.numel()
            spans.append((at, at + 4 * n))
            if host_conversion:
                assert conv_at >= at + 4 * n and conv_at % 64 == 0
                spans.append((conv_at, conv_at + 8 * n))
            else:
                assert conv_at == -1
            assert at % 64 == 0
            # Added, not copied: an element covered twice would hold twice its number.
            piece.add_(torch.arange(first + 1, first + n + 1, dtype=torch.float64).view(piece.shape))
        spans.sort()
        assert spans[-1][1] <= capacity
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for d in dests:
        assert torch.equal(d, torch.arange(1, d.numel() + 1, dtype=torch.float64).view(d.shape))


@pytest.mark.parametrize("limit", [8, 1000, 1 << 20])
def test_spans_map_each_piece_once_within_the_limit(limit):
    """The plan of the mapped route, on its own: spans of one file each, in file order, at most
    `limit` bytes unless one piece alone is larger (an element larger than the limit); the
    pieces of each destination cover each of its elements once, at its place in the file."""
    dests = [torch.zeros(7, 300, dtype=torch.float64).t(),
             torch.zeros(40, 3, 5, dtype=torch.float64)[:, 1],
             torch.zeros(1000, dtype=torch.float64)[::3],
             torch.zeros((), dtype=torch.float64),
             torch.zeros(0, 5, dtype=torch.float64),
             torch.zeros(123, dtype=torch.float64)]
    # Two files, the writes out of file order, 4-byte elements at distinct offsets in each.
    offsets = [5000, 100, 20000, 0, 50, 9000]
    writes = [_load_into._Write(f"d{i}", d, i % 2, offsets[i], torch.float32) for i, d in enumerate(dests)]
    seen = []
    for file, first, end, pieces in _load_into._spans(writes, limit):
        assert end - first <= limit or len(pieces) == 1
        for w, piece, offset in pieces:
            assert w.file == file and first <= offset and offset + 4 * piece.numel() <= end
            start = (offset - w.offset) // 4
            piece.add_(torch.arange(start + 1, start + piece.numel() + 1, dtype=torch.float64).view(piece.shape))
            seen.append((file, offset))
    assert seen == sorted(seen)
    for d in dests:
        assert torch.equal(d, torch.arange(1, d.numel() + 1, dtype=torch.float64).view(d.shape))


def test_progress_ends_at_the_total(tmp_path):
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(1000), "b": torch.ones(10, 10).double()})
    calls = []
    state = {"a": torch.zeros(1000), "b": torch.zeros(10, 10)}
    fst.torch.load_into(state, path, progress=lambda done, total: calls.append((done, total)), budget=256)
    assert calls and calls[-1] == (4000 + 800, 4000 + 800)
    assert all(d <= t for d, t in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_load_model_loads_in_place(tmp_path):
    src = two_layers()
    safetensors.torch.save_model(src, str(tmp_path / "m.safetensors"))
    dst = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4))
    weight = dst[0].weight
    assert fst.torch.load_model(dst, tmp_path / "m.safetensors") == ([], [])
    assert dst[0].weight is weight
    assert_same_state(dst.state_dict(), src.state_dict())


def test_what_is_not_a_destination_is_refused(tmp_path):
    path = save(tmp_path / "m.safetensors", {"a": torch.ones(2)})
    with pytest.raises(TypeError, match="Module or a state dict"):
        fst.torch.load_into([torch.zeros(2)], path)
    with pytest.raises(TypeError, match="'a' is a ndarray"):
        fst.torch.load_into({"a": torch.zeros(2).numpy()}, path)


# ---- CUDA destinations (run by scripts/gpu_check.sh on a GPU machine) -----------------------


@pytest.mark.parametrize("budget", [None, 4096], ids=["default-budget", "4KiB"])
@pytest.mark.parametrize("src,dst", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                     (torch.bfloat16, torch.float32), (torch.int64, torch.int32),
                                     (torch.float32, torch.float8_e4m3fn)], ids=str)
@pytest.mark.gpu
@needs_cuda
def test_cuda_destinations_as_load_state_dict(tmp_path, src, dst, budget):
    tensors = {f"t{i}": values(src, s, i) for i, s in enumerate(SHAPES)}
    tensors["transposed"] = values(src, (70, 33), 99)
    path = save(tmp_path / "m.safetensors", tensors)

    def destinations():
        out = Buffers([garbage(dst, s).cuda() for s in SHAPES])
        out.register_buffer("transposed", torch.zeros(33, 70, dtype=dst, device="cuda").t())
        return out

    got, want = destinations(), destinations()
    assert fst.torch.load_into(got, path, budget=budget) == ([], [])
    reference_load(want, path)
    assert got.transposed.stride() == (1, 70)
    assert_same_state(got.state_dict(), want.state_dict())


@pytest.mark.gpu
@needs_cuda
def test_cuda_writes_follow_and_precede_the_current_stream(tmp_path):
    n = 1 << 24
    path = save(tmp_path / "m.safetensors", {"p": values(torch.float32, (n,), 0)})
    want = safetensors.torch.load_file(str(path))["p"].cuda()
    stream = torch.cuda.Stream()
    p = torch.nn.Parameter(torch.zeros(n, device="cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    with torch.cuda.stream(stream):
        for _ in range(20):  # keeps the stream busy for a while before the fill
            a = a @ a
            a = a / a.norm()
        p.data.fill_(7.0)  # queued before the load: must not land after it
        fst.torch.load_into({"p": p}, path, budget=1 << 20)
        total = p.detach().double().sum()  # queued after the load: must see it
    torch.cuda.synchronize()
    assert same(p.detach(), want)
    assert total.item() == want.double().sum().item()

