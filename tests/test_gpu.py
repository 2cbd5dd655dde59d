"""GPU loading: bit-exact against safetensors on CUDA, alignment, lifetimes, OOM, no leaks.

Marked `gpu`; skipped without a CUDA device. scripts/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import fst
from checkpoints import ALL_DTYPES, assert_same_bits, load_conversion, raw_bytes, write

torch = pytest.importorskip("torch")
import safetensors  # noqa: E402

from fst.adapters.torch import conversion_mode  # noqa: E402

CUDA = fst._core.cuda_driver_info()["available"] and torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]

SHAPES = [[], [0], [1], [7], [3, 5], [2, 3, 5], [64, 1000]]


def reference(path):
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def every_dtype(tmp_path, prefix=b""):
    dtypes = [d for d in ALL_DTYPES if not d.startswith("F6")]
    tensors = []
    for d in dtypes:
        for i, s in enumerate([[2], [4, 6]] if d == "F4" else SHAPES):
            tensors.append((f"{d}.{i}", d, s))
    return write(tmp_path / "m.safetensors", tensors, prefix=prefix)


@pytest.mark.parametrize("backend", ["auto", "pread", "direct"])
@pytest.mark.parametrize("prefix", [b"", b"\x01\x02\x03"], ids=["aligned", "shift3"])
def test_torch_cuda_every_dtype(tmp_path, backend, prefix):
    path = every_dtype(tmp_path, prefix)
    if backend == "direct" and not fst._core.direct_io_supported(str(path))[0]:
        pytest.skip(f"{tmp_path} does not support O_DIRECT (tmpfs before Linux 6.6?)")
    got = fst.load(path, framework="torch", device="cuda", backend=backend)
    ref = reference(path)
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        assert t.device.type == "cuda", name
        assert t.dtype == ref[name].dtype, name
        assert t.data_ptr() % 256 == 0, name
        assert raw_bytes(t) == raw_bytes(ref[name]), name


def test_cuda_index_filters_and_many_files(tmp_path):
    for k in range(3):
        write(tmp_path / f"part{k}.safetensors", [(f"p{k}.w{i}", "BF16", [k + 1, 1000 + i]) for i in range(10)], seed=k)
    ref = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        ref.update(reference(f))
    got = fst.load(tmp_path, framework="torch", device="cuda:0", keys="p1.*")
    assert sorted(got) == sorted(k for k in ref if k.startswith("p1."))
    for name, t in got.items():
        assert torch.equal(t.cpu(), ref[name])


def test_tensors_outlive_loader_and_file(tmp_path):
    path = write(tmp_path / "m.safetensors", [("x", "F32", [1 << 20])])
    ref = raw_bytes(reference(path)["x"])
    x = fst.load(path, framework="torch", device="cuda")["x"]
    with fst.safe_open(path, "pt", device="cuda") as f:
        y = f.get_slice("x")[10:1000]
    path.unlink()
    torch.cuda.synchronize()
    assert raw_bytes(x) == ref
    assert raw_bytes(y) == ref[40:4000]


def test_out_of_memory_is_a_clear_error_and_leaks_nothing(tmp_path):
    free, _ = torch.cuda.mem_get_info()
    rows = (free * 2) // (4 * 4096) + 1
    path = tmp_path / "huge.safetensors"
    import json
    import struct

    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, 4096], "data_offsets": [0, rows * 4096 * 4]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + rows * 4096 * 4)  # sparse: no disk used
    before = torch.cuda.mem_get_info()[0]
    with pytest.raises(fst.FstError, match="out of GPU memory"):
        fst.load(path, framework="torch", device="cuda")
    assert torch.cuda.mem_get_info()[0] >= before - (64 << 20)


def test_no_leak_of_device_or_pinned_memory(tmp_path):
    psutil = pytest.importorskip("psutil")

    path = write(tmp_path / "m.safetensors", [(f"t{i}", "BF16", [1024, 1024]) for i in range(16)])
    for _ in range(3):
        fst.load(path, framework="torch", device="cuda")
    torch.cuda.synchronize()
    free0, rss0 = torch.cuda.mem_get_info()[0], psutil.Process().memory_info().rss
    for _ in range(50):
        d = fst.load(path, framework="torch", device="cuda")
        del d
    torch.cuda.synchronize()
    free1, rss1 = torch.cuda.mem_get_info()[0], psutil.Process().memory_info().rss
    assert free1 >= free0 - (8 << 20)
    assert rss1 - rss0 < 64 << 20


def test_jax_gpu_arrays(tmp_path):
    jax = pytest.importorskip("jax")
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU")
    path = write(tmp_path / "m.safetensors", [("a", "BF16", [33, 17]), ("b", "F32", [5]), ("c", "I8", [7])], prefix=b"\x01")
    got = fst.load(path, framework="jax", device=gpus[0])
    ref = reference(path)
    for name, arr in got.items():
        assert arr.devices() == {gpus[0]}
        assert raw_bytes(arr) == raw_bytes(ref[name]), name


def test_iter_tensors_on_cuda(tmp_path):
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F16", [i + 1, 513]) for i in range(30)])
    ref = reference(path)
    streamed = dict(fst.iter_tensors(path, framework="torch", device="cuda", budget=4096))
    assert sorted(streamed) == sorted(ref)
    for name, t in streamed.items():
        assert raw_bytes(t) == raw_bytes(ref[name])


def _all_bit_patterns(tmp_path):
    """Every bit pattern of F16 and BF16 and of the FP8 types, as tensors of one file."""
    import json
    import struct

    import numpy as np

    blobs = {
        "F16": np.arange(1 << 16, dtype=np.uint16).tobytes(),
        "BF16": np.arange(1 << 16, dtype=np.uint16).tobytes(),
        "F8_E4M3": np.arange(256, dtype=np.uint8).tobytes(),
        "F8_E5M2": np.arange(256, dtype=np.uint8).tobytes(),
        "F8_E8M0": np.arange(256, dtype=np.uint8).tobytes(),
    }
    header, data, offset = {}, b"\x01", 1  # one stray byte: every tensor starts misaligned
    header["pad"] = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    for dtype, blob in blobs.items():
        width = 2 if dtype in ("F16", "BF16") else 1
        header[dtype] = {"dtype": dtype, "shape": [len(blob) // width], "data_offsets": [offset, offset + len(blob)]}
        data += blob
        offset += len(blob)
    text = json.dumps(header).encode()
    path = tmp_path / "bits.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("target", ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"])
def test_device_conversion_kernels_match_torch(tmp_path, target):
    """Every bit pattern through the conversion kernel (dtype= on a GPU load), against what
    loads promise (torch 2.13's CPU tensor.to()), bit for bit; small staging buffers so tensors
    span requests."""
    torch_dtype = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                   "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}[target]
    path = _all_bit_patterns(tmp_path)
    keys = ["F16", "BF16", "F8_E4M3", "F8_E5M2"] + (["F8_E8M0"] if target in ("F64", "F32", "F16", "BF16") else [])
    ref = fst.load(path, framework="torch", keys=keys)
    os.environ["FST_STAGING_BUFFER"] = str(1 << 16)
    try:
        got = fst.load(path, framework="torch", device="cuda", dtype=target, keys=keys)
    finally:
        del os.environ["FST_STAGING_BUFFER"]
    for name, t in got.items():
        assert t.device.type == "cuda" and t.dtype == torch_dtype, name
        assert_same_bits(t, load_conversion(ref[name], torch_dtype), f"{name} -> {target}")


_TORCH = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
          "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


@pytest.mark.parametrize("pair", ["BF16:F32", "F32:BF16", "BF16:F16", "F16:F8_E4M3", "F32:F8_E5M2",
                                  "F8_E4M3:BF16", "F64:F16", "F32:F32"])
def test_conversion_kernel_on_large_tensors_writes_every_element(pair):
    """Millions of random bit patterns (every sign, exponent and payload, so NaN, infinities and
    subnormals too) at odd sizes and addresses through fst's kernel on device memory, into an
    output poisoned beforehand: bit for bit what the installed torch's CPU tensor.to() gives,
    in the conversion mode fst picks for that torch."""
    src, dst = pair.split(":")
    s_t, d_t = getattr(torch, _TORCH[src]), getattr(torch, _TORCH[dst])
    gen = torch.Generator().manual_seed(7)
    width = torch.empty((), dtype=s_t).element_size()
    count = 3_000_001
    raw = torch.randint(0, 256, (count * width + 1,), dtype=torch.uint8, generator=gen)
    host = raw[1:].clone().view(s_t)  # the device copy starts one byte in: an odd address
    want = host.to(d_t)
    dev_raw = raw.cuda()
    out = torch.full((count * want.element_size() + 3,), 0xA5, dtype=torch.uint8, device="cuda")
    fst._core.convert_on_device(torch.cuda.current_device(), dev_raw.data_ptr() + 1, src,
                                out.data_ptr() + 1, dst, count, mode=conversion_mode())
    got = out[1:-2].cpu().clone()  # a tensor of its own (offset 0), so it can be viewed as d_t
    assert out[0].item() == 0xA5 and out[-2:].tolist() == [0xA5, 0xA5]  # nothing outside written
    assert_same_bits(got.view(d_t), want, pair)


@pytest.mark.parametrize("mode", fst._core.CONVERT_MODES)
def test_conversion_kernel_follows_the_host_twin_in_every_mode(mode):
    """A GPU target follows the same reference as the CPU: every 16-bit pattern (and random
    F32/F64 ones) through the kernel in each mode, against the host conversion of that mode
    (which tests/test_conversion_reference.py checks against the frameworks themselves)."""
    gen = torch.Generator().manual_seed(11)
    for src, dst in [(s, d) for s in _TORCH for d in _TORCH if s != d] + [("F8_E8M0", "F32"), ("F8_E8M0", "F64")]:
        width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(src, 1)
        if width <= 2:
            raw = torch.arange(1 << (8 * width), dtype=torch.int32).to(torch.int16 if width == 2 else torch.uint8)
            raw = raw.view(torch.uint8)
        else:
            raw = torch.randint(0, 256, (width * 200_003,), dtype=torch.uint8, generator=gen)
        want = fst._core.convert(raw.numpy().tobytes(), src, dst, mode=mode)
        out = torch.empty(len(want), dtype=torch.uint8, device="cuda")
        dev = raw.cuda()
        fst._core.convert_on_device(torch.cuda.current_device(), dev.data_ptr(), src, out.data_ptr(), dst,
                                    raw.numel() // width, mode=mode)
        assert bytes(out.cpu().numpy()) == bytes(want), f"{mode} {src}->{dst}"


def _random_moves(gen, src_len: int, n: int):
    """n moves (src offset, dst offset, bytes): sizes from 0 to 300 KB, mostly small, at every
    alignment on both sides; destinations in order with random gaps, never overlapping."""
    moves, cursor = [], 0
    for _ in range(n):
        scale = int(torch.randint(0, 3, (1,), generator=gen))
        size = int(torch.randint(0, (64, 5000, 300_000)[scale], (1,), generator=gen))
        src_off = int(torch.randint(0, src_len - size + 1, (1,), generator=gen))
        dst_off = cursor + int(torch.randint(0, 300, (1,), generator=gen))
        moves.append((src_off, dst_off, size))
        cursor = dst_off + size
    return moves, cursor + 300


def test_move_kernel_places_many_tensors_in_one_launch():
    """The alignment kernel: 700 moves of random sizes from random source offsets to slots at
    random alignments, in one launch, into a poisoned buffer: every slot holds its source
    bytes and every byte between the slots keeps the poison."""
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (4 << 20,), dtype=torch.uint8, generator=gen)
    moves, dst_len = _random_moves(gen, src.numel(), 700)
    want = torch.full((dst_len,), 0xA5, dtype=torch.uint8)
    for s_off, d_off, size in moves:
        want[d_off:d_off + size] = src[s_off:s_off + size]
    src_dev = src.cuda()
    dst_dev = torch.full((dst_len,), 0xA5, dtype=torch.uint8, device="cuda")
    base_s, base_d = src_dev.data_ptr(), dst_dev.data_ptr()
    fst._core.move_on_device(torch.cuda.current_device(),
                             [(base_s + s_off, base_d + d_off, size) for s_off, d_off, size in moves])
    got = dst_dev.cpu()
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:5].reshape(-1).tolist()
        raise AssertionError(f"bytes differ first at {bad}")


def test_conversion_kernel_refuses_an_unsupported_pair():
    with pytest.raises(fst.UnsupportedError):
        fst._core.convert_on_device(torch.cuda.current_device(), 0, "I32", 0, "F32", 1)


# ---------------------------------------------------------------- GPU Direct Storage -------

# Whether forced GDS loads can run: cuFile itself (compatibility mode included, which the
# automatic choice declines without nvidia-fs but backend="gds" still uses).
GDS = (fst._core.cufile_info(fst._runtime.bundled_cufile()) if CUDA
       else {"available": False, "reason": "no CUDA device"})
needs_gds = pytest.mark.skipif(not GDS["available"], reason=f"cuFile is not usable: {GDS['reason']}")


@pytest.fixture
def gds_dir(tmp_path):
    """Where forced GDS loads read from: $FST_GDS_TEST_DIR (a directory on storage GDS serves,
    such as a local NVMe file system) or the test's temporary directory, which must at least
    take O_DIRECT (tmpfs before Linux 6.6 does not)."""
    import tempfile

    base = os.environ.get("FST_GDS_TEST_DIR")
    folder = Path(tempfile.mkdtemp(dir=base)) if base else tmp_path
    probe = folder / "probe"
    probe.write_bytes(b"\0" * 4096)
    if not fst._core.direct_io_supported(str(probe))[0]:
        pytest.skip(f"{folder} does not take O_DIRECT: set FST_GDS_TEST_DIR to a directory that does")
    probe.unlink()
    yield folder
    if base:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@needs_gds
@pytest.mark.parametrize("prefix", [b"", b"\x01\x02\x03"], ids=["aligned", "shift3"])
def test_gds_every_dtype_bit_exact_and_aligned(gds_dir, prefix):
    path = every_dtype(gds_dir, prefix)
    got = fst.load(path, framework="torch", device="cuda", backend="gds")
    stats = fst.last_load_stats()
    assert stats["backend"] == "gds", stats
    ref = reference(path)
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        assert t.device.type == "cuda" and t.dtype == ref[name].dtype, name
        assert t.data_ptr() % 256 == 0, name
        assert raw_bytes(t) == raw_bytes(ref[name]), name


@needs_gds
def test_gds_small_bulk_buffer_many_files_and_filters(gds_dir, monkeypatch):
    """A 64 KiB device buffer read 16 KiB at a time: many windows, tensors cut between them."""
    monkeypatch.setenv("FST_GDS_BUFFER", str(1 << 16))
    monkeypatch.setenv("FST_STAGING_BUFFER", str(1 << 14))
    for k in range(3):
        write(gds_dir / f"part{k}.safetensors",
              [(f"p{k}.pad", "U8", [k + 1])] + [(f"p{k}.w{i}", "BF16", [k + 1, 9000 + i]) for i in range(10)], seed=k)
    ref = {}
    for f in sorted(gds_dir.glob("*.safetensors")):
        ref.update(reference(f))
    for keys in (None, ["p1.*", "p2.w[357]"]):
        got = fst.load(gds_dir, framework="torch", device="cuda", backend="gds", keys=keys)
        assert fst.last_load_stats()["backend"] == "gds"
        assert got and all(k in ref for k in got)
        for name, t in got.items():
            assert t.data_ptr() % 256 == 0, name
            assert raw_bytes(t) == raw_bytes(ref[name]), name


@needs_gds
@pytest.mark.parametrize("target", ["F32", "BF16", "F8_E4M3"])
def test_gds_converts_on_the_device(gds_dir, target, monkeypatch):
    torch_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn}[target]
    path = _all_bit_patterns(gds_dir)
    keys = ["F16", "BF16", "F8_E4M3", "F8_E5M2"]
    ref = fst.load(path, framework="torch", keys=keys)
    monkeypatch.setenv("FST_GDS_BUFFER", str(1 << 16))  # tensors cut between windows too
    got = fst.load(path, framework="torch", device="cuda", backend="gds", dtype=target, keys=keys)
    assert fst.last_load_stats()["backend"] == "gds"
    for name, t in got.items():
        assert t.device.type == "cuda" and t.dtype == torch_dtype and t.data_ptr() % 256 == 0, name
        assert_same_bits(t, load_conversion(ref[name], torch_dtype), f"{name} -> {target}")


@needs_gds
def test_gds_repeated_loads_leak_no_device_memory_fds_or_threads(gds_dir):
    import gc

    psutil = pytest.importorskip("psutil")

    path = write(gds_dir / "m.safetensors", [(f"t{i}", "BF16", [1024, 1024]) for i in range(16)], prefix=b"\x01")
    for _ in range(3):
        fst.load(path, framework="torch", device="cuda", backend="gds")
    torch.cuda.synchronize()
    gc.collect()
    proc = psutil.Process()
    before = torch.cuda.mem_get_info()[0], len(os.listdir("/proc/self/fd")), proc.num_threads()
    for _ in range(30):
        d = fst.load(path, framework="torch", device="cuda", backend="gds")
        del d
    torch.cuda.synchronize()
    gc.collect()
    after = torch.cuda.mem_get_info()[0], len(os.listdir("/proc/self/fd")), proc.num_threads()
    assert after[0] >= before[0] - (8 << 20)
    assert after[1:] == before[1:]


def test_auto_gpu_load_uses_gds_only_where_it_really_works(tmp_path):
    path = write(tmp_path / "m.safetensors", [("a", "F32", [1000]), ("b", "BF16", [33, 7])], prefix=b"\x01")
    got = fst.load(path, framework="torch", device="cuda")
    stats = fst.last_load_stats()
    use_gds, why = fst._runtime.gds_choice()
    if use_gds:
        assert stats["backend"] == "gds" or stats["reason"].startswith("GPU Direct Storage not used: "), stats
    else:
        assert stats["backend"] == "pread" and stats["reason"].startswith(why + "; "), stats
    ref = reference(path)
    for name, t in got.items():
        assert raw_bytes(t) == raw_bytes(ref[name]), name


def test_the_staging_pool_is_kept_across_loads_and_released_on_request(tmp_path):
    """Loads after the first pin nothing new; release_staging() frees the pool's buffers."""
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "BF16", [257, 129]) for i in range(12)], prefix=b"\x01")
    ref = reference(path)
    device = torch.cuda.current_device()

    def pool():
        return next(p for p in fst.runtime_info()["staging"] if p["device"] == device)

    fst.load(path, framework="torch", device="cuda")
    first = pool()
    for _ in range(3):
        got = fst.load(path, framework="torch", device="cuda")
    later = pool()
    assert later["allocations"] == first["allocations"] and 0 < later["pinned_bytes"] <= later["budget"], later
    assert later["in_use"] == 0
    for name, t in got.items():
        assert raw_bytes(t) == raw_bytes(ref[name]), name
    assert fst.release_staging() == later["pinned_bytes"]
    assert pool()["pinned_bytes"] == 0
