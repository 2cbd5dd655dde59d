"""GPU Direct Storage (cuFile) without a GPU: the shim's reasons, the refusals, the automatic
choice, and the whole GDS plan run end to end on host memory (O_DIRECT reads into a bulk
buffer, then the host twins of the move and conversion kernels), bit for bit against the
safetensors package. The cuFile device itself runs in test_gpu.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors
import torch

import fst
from checkpoints import ALL_DTYPES, raw_bytes, write
from fst import _core, _runtime
from fst._loading import start_load
from fst.adapters import get_adapter
from test_resources import snapshot

SHAPES = [[], [0], [1], [7], [3, 5], [2, 3, 5], [64, 100]]
TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def reference(path) -> dict[str, torch.Tensor]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def every_dtype(path, prefix=b""):
    """Every dtype torch and the reference hold (F6 has neither), odd shapes, odd offsets."""
    tensors = []
    for d in (d for d in ALL_DTYPES if not d.startswith("F6")):
        for i, s in enumerate([[0], [2], [4, 6]] if d == "F4" else SHAPES):
            tensors.append((f"{d}.{i}", d, s))
    return write(path, tensors, prefix=prefix)


def host_gds(selection, threads=2, request_bytes=16 << 20, bulk_bytes=512 << 20, merge_gap=1 << 20):
    """The GDS load of `selection` on host memory, exported as torch CPU tensors."""
    loaded = selection.start_gds(-1, _core.GdsOptions(threads=threads, request_bytes=request_bytes,
                                                      bulk_bytes=bulk_bytes, merge_gap=merge_gap)).wait()
    assert loaded.stats["backend"] == "gds"
    assert loaded.casts == []  # the device converts: nothing left to the framework
    return loaded, get_adapter("torch").export(loaded, "cpu")


def assert_same(got, ref):
    assert sorted(got) == sorted(ref)
    for name, t in got.items():
        assert t.dtype == ref[name].dtype, name
        assert tuple(t.shape) == tuple(ref[name].shape), name
        assert raw_bytes(t) == raw_bytes(ref[name]), name
        assert t.data_ptr() % 256 == 0, name


# ---------------------------------------------------------------- the shim ---------------


def _cufile_info_in_subprocess(env_library: str, bundled: str) -> dict:
    """cufile_info() in a fresh process: the library, once loaded, stays for the process."""
    code = f"import json, fst; print(json.dumps(fst._core.cufile_info({bundled!r})))"
    env = dict(os.environ, FST_CUFILE_LIBRARY=env_library)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_shim_without_a_library_says_what_it_tried(tmp_path):
    not_a_library = tmp_path / "libcufile.so.0"
    not_a_library.write_bytes(b"this is no ELF file")
    missing = str(tmp_path / "nowhere" / "libcufile.so.0")
    info = _cufile_info_in_subprocess(missing, str(not_a_library))
    if info["library"] == "libcufile.so.0":
        pytest.skip("this machine has libcufile.so.0 on the loader path")
    assert info["available"] is False and info["library"] == ""
    assert info["reason"].startswith("libcufile.so.0 not found (tried 3: ")
    assert missing in info["reason"]  # $FST_CUFILE_LIBRARY first
    assert str(not_a_library) in info["reason"]  # then the soname, then the pip package's copy
    assert info["compat_mode"] is False


def test_environment_variable_names_the_library(tmp_path):
    """FST_CUFILE_LIBRARY is tried before anything else (and a file that is no library is
    reported, not loaded)."""
    bogus = tmp_path / "mine.so"
    bogus.write_bytes(b"\x7fELF garbage")
    info = _cufile_info_in_subprocess(str(bogus), "")
    if info["library"]:
        pytest.skip("a real cuFile library loaded from the soname")
    assert str(bogus) in info["reason"] and "libcufile.so.0" in info["reason"]


def test_bundled_library_is_found_on_sys_path(tmp_path, monkeypatch):
    old = tmp_path / "a" / "nvidia" / "cufile" / "lib"  # nvidia-cufile-cu12 layout
    new = tmp_path / "b" / "nvidia" / "cu13" / "lib"  # nvidia-cufile >= 1.15 layout
    for d in (old, new):
        d.mkdir(parents=True)
        (d / "libcufile.so.0").write_bytes(b"")
    try:
        monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing"), str(tmp_path / "b"), str(tmp_path / "a")])
        _runtime.bundled_cufile.cache_clear()
        assert _runtime.bundled_cufile() == str(new / "libcufile.so.0")
        monkeypatch.setattr(sys, "path", [str(tmp_path / "a")])
        _runtime.bundled_cufile.cache_clear()
        assert _runtime.bundled_cufile() == str(old / "libcufile.so.0")
        monkeypatch.setattr(sys, "path", [str(tmp_path / "nothing")])
        _runtime.bundled_cufile.cache_clear()
        assert _runtime.bundled_cufile() == ""
    finally:
        _runtime.bundled_cufile.cache_clear()


def test_runtime_info_reports_cufile_and_the_gpu_backend():
    info = fst.runtime_info()
    cuf = info["cufile"]
    assert set(cuf) >= {"available", "reason", "library", "compat_mode", "driver"}
    use_gds, why = _runtime.gds_choice()
    if not cuf["available"]:
        assert not use_gds and cuf["reason"] and cuf["reason"] in why
    if not info["cuda_driver"]["available"]:
        # No driver: no GPU load, and no plan described for one.
        assert info["gpu_backend"] is None and info["gpu_loading"].startswith("none (no CUDA driver")
        return
    assert info["gpu_backend"] == {"backend": "gds" if use_gds else "pread", "reason": why}
    assert why in info["gpu_loading"] or use_gds


def test_without_nvidia_fs_gds_is_declined_without_opening_cufile(monkeypatch, tmp_path):
    """No nvidia-fs module: the automatic choice and runtime_info() say so from the module
    list alone; the cuFile driver (slow to open, sometimes hanging) is never touched."""
    def must_not_open(*_args):
        raise AssertionError("cuFile was probed")

    monkeypatch.setattr(_runtime, "NVIDIA_FS", tmp_path / "module" / "nvidia_fs")
    monkeypatch.setattr(fst._core, "cufile_info", must_not_open)
    use_gds, why = _runtime.gds_choice()
    assert not use_gds and "nvidia-fs kernel driver is not loaded" in why
    info = fst.runtime_info()
    assert info["cufile"]["available"] is False and info["cufile"]["compat_mode"] is True
    if info["cuda_driver"]["available"]:
        assert info["gpu_backend"]["backend"] == "pread"
    # With the module present the choice asks cuFile (here: compatibility mode, declined).
    (tmp_path / "module" / "nvidia_fs").mkdir(parents=True)
    monkeypatch.setattr(fst._core, "cufile_info", lambda _lib: {
        "available": True, "reason": "", "library": "x", "compat_mode": True, "driver": "compat"})
    assert _runtime.gds_choice() == (False, "GPU Direct Storage not used: cuFile would run in compatibility mode (compat)")


# ---------------------------------------------------------------- refusals ---------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    tensors = [(f"t{i}", "F32", [64, 33]) for i in range(8)]
    return write(tmp_path_factory.mktemp("gds") / "m.safetensors", tensors, prefix=b"\x01")


def test_forced_gds_without_cufile_raises_the_reason_and_leaks_nothing(small):
    info = fst._core.cufile_info(_runtime.bundled_cufile())  # cuFile itself: what a forced load uses
    if info["available"]:
        pytest.skip("cuFile is usable here")
    selection = fst.open_checkpoint(small).select(None)
    with pytest.raises(fst.UnsupportedError) as first:
        selection.start_gds(0, _core.GdsOptions(threads=2, request_bytes=1 << 20, bulk_bytes=1 << 20),
                            bundled_library=_runtime.bundled_cufile())
    assert "GPU Direct Storage is not usable here" in str(first.value)
    assert info["reason"] in str(first.value)
    fds, threads, _ = snapshot()
    for _ in range(20):
        with pytest.raises(fst.UnsupportedError):
            selection.start_gds(0, _core.GdsOptions(threads=2, request_bytes=1 << 20, bulk_bytes=1 << 20),
                                bundled_library=_runtime.bundled_cufile())
    assert snapshot()[:2] == (fds, threads)


def test_gds_is_refused_for_host_targets(small, monkeypatch):
    with pytest.raises(fst.UnsupportedError, match="reads into GPU memory"):
        fst.load(small, backend="gds")
    with pytest.raises(fst.UnsupportedError, match="reads into GPU memory"):
        fst.safe_open(small, "np", backend="gds")
    monkeypatch.setenv("FST_BACKEND", "gds")  # a name FST_BACKEND accepts
    with pytest.raises(fst.UnsupportedError, match="reads into GPU memory"):
        fst.load(small, framework="torch")
    monkeypatch.setenv("FST_BACKEND", "nvme")
    with pytest.raises(ValueError, match="mmap or gds"):
        fst.load(small)


# ---------------------------------------------------------------- automatic choice --------


class _FakeGpuAdapter:
    """Says every device is GPU -1: the load path's "GPU" is then the host device and sink."""

    name = "torch"
    alignment = 64
    view_alignment = 0

    def cuda_index(self, device):
        return -1


def test_auto_falls_back_to_staging_with_the_reason(small, monkeypatch):
    selection = fst.open_checkpoint(small).select(None)
    monkeypatch.setattr(_runtime, "gds_choice", lambda: (False, "GPU Direct Storage not used: no cuFile here"))
    loaded = start_load(_FakeGpuAdapter(), selection, "cuda", "auto", 2).wait()
    assert loaded.stats["backend"] == "pread"
    assert loaded.stats["reason"].startswith("GPU Direct Storage not used: no cuFile here; ")
    assert "pinned staging buffers" in loaded.stats["reason"]


def test_auto_uses_gds_where_it_works(small, monkeypatch):
    selection = fst.open_checkpoint(small).select(None)
    monkeypatch.setattr(_runtime, "gds_choice", lambda: (True, "GPU Direct Storage: test"))
    loaded = start_load(_FakeGpuAdapter(), selection, "cuda", "auto", 2).wait()
    assert loaded.stats["backend"] == "gds"
    assert loaded.stats["reason"].startswith("GPU Direct Storage (host memory")
    assert_same(get_adapter("torch").export(loaded, "cpu"), reference(small))


class _SelectionWhoseFilesGdsCannotOpen:
    def __init__(self):
        self.staged = None

    def start_gds(self, *args, **kwargs):
        raise fst.UnsupportedError("'/x.safetensors': the file system does not support O_DIRECT, which cuFile needs")

    def start_staged(self, *args, note="", sink=None):
        self.staged = (args, note)
        return "staged"


class _SelectionWhoseBulkBufferDoesNotFit(_SelectionWhoseFilesGdsCannotOpen):
    def start_gds(self, *args, **kwargs):
        raise fst.CudaError("out of GPU memory on cuda:0: the load needs 536875008 bytes, 4096 are free")


def test_auto_falls_back_when_the_bulk_buffer_does_not_fit(monkeypatch):
    monkeypatch.setattr(_runtime, "gds_choice", lambda: (True, "GPU Direct Storage: test"))
    sel = _SelectionWhoseBulkBufferDoesNotFit()
    assert start_load(_FakeGpuAdapter(), sel, "cuda", "auto", 0) == "staged"
    assert sel.staged[1].startswith("GPU Direct Storage not used: out of GPU memory")
    with pytest.raises(fst.CudaError, match="out of GPU memory"):
        start_load(_FakeGpuAdapter(), _SelectionWhoseBulkBufferDoesNotFit(), "cuda", "gds", 0)


def test_auto_falls_back_when_a_file_cannot_be_registered(monkeypatch):
    monkeypatch.setattr(_runtime, "gds_choice", lambda: (True, "GPU Direct Storage: test"))
    sel = _SelectionWhoseFilesGdsCannotOpen()
    assert start_load(_FakeGpuAdapter(), sel, "cuda", "auto", 0) == "staged"
    args, note = sel.staged
    assert args[1].backend == "pread"
    assert note == "GPU Direct Storage not used: '/x.safetensors': the file system does not support O_DIRECT, which cuFile needs"
    # Forced, the same failure is the caller's error.
    with pytest.raises(fst.UnsupportedError, match="O_DIRECT"):
        start_load(_FakeGpuAdapter(), _SelectionWhoseFilesGdsCannotOpen(), "cuda", "gds", 0)


# ---------------------------------------------------------------- the plan ----------------


def _check_plan(ckpt, selection, plan, bulk_bytes, request_bytes):
    entries = {e[0]: e for e in ckpt.entries()}  # name -> (..., file, absolute offset)
    names = selection.names()
    covered = [0] * len(names)
    for w in plan["windows"]:
        assert 0 < w["bulk_used"] <= bulk_bytes and w["bulk_used"] % 4096 == 0
        reads = sorted(w["reads"], key=lambda r: r[4])
        for file, offset, length, needed, bulk in reads:
            assert offset % 4096 == 0 and length % 4096 == 0 and bulk % 4096 == 0
            assert 0 < needed <= length <= request_bytes
            assert bulk + length <= w["bulk_used"]
        for a, b in zip(reads, reads[1:]):
            assert a[4] + a[2] <= b[4]  # reads never land on each other
        for src, slot, size, pick in w["moves"]:
            # The bytes at `src` are the file's bytes of this piece of the tensor.
            name = names[pick]
            read = next(r for r in reads if r[4] <= src < r[4] + r[2])
            assert read[0] == entries[name][5]
            assert read[1] + (src - read[4]) == entries[name][6] + (slot - plan["slots"][pick])
            covered[pick] += size
    for i, name in enumerate(names):
        e = entries[name]
        assert plan["slots"][i] % 256 == 0
        assert covered[i] == e[4] - e[3], name  # every byte moved once


@pytest.mark.parametrize("bulk_bytes", [8192, 3 * 4096, 1 << 16, 512 << 20])
@pytest.mark.parametrize("request_bytes", [4096, 16384, 16 << 20])
def test_plan_reads_whole_pages_within_the_bulk_buffer(tmp_path, bulk_bytes, request_bytes):
    path = every_dtype(tmp_path / "m.safetensors", prefix=b"abc")
    ckpt = fst.open_checkpoint(path)
    selection = ckpt.select(None)
    plan = selection.plan_gds(256, request_bytes, bulk_bytes)
    _check_plan(ckpt, selection, plan, bulk_bytes, request_bytes)
    assert plan["bulk_bytes"] == max(w["bulk_used"] for w in plan["windows"])
    if bulk_bytes >= 1 << 20:
        assert len(plan["windows"]) == 1  # the whole selection at once: one launch
    else:
        assert len(plan["windows"]) > 1


def test_plan_rejects_bad_sizes(small):
    selection = fst.open_checkpoint(small).select(None)
    with pytest.raises(ValueError, match="multiple of 4096"):
        selection.plan_gds(256, 1000, 1 << 20)
    with pytest.raises(ValueError, match="at least 8192"):
        selection.plan_gds(256, 4096, 4096)
    with pytest.raises(ValueError, match="multiple of 4096"):
        selection.start_gds(-1, _core.GdsOptions(threads=1, request_bytes=4096, bulk_bytes=10000))


def test_plan_reads_holes_up_to_the_merge_gap(tmp_path):
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "U8", [10000]) for i in range(10)])
    selection = fst.open_checkpoint(path).select(["t1", "t3", "t5"])
    merged = selection.plan_gds(256, 16 << 20, 1 << 20, 1 << 20)
    apart = selection.plan_gds(256, 16 << 20, 1 << 20, 0)
    assert len(merged["windows"][0]["reads"]) == 1
    assert len(apart["windows"][0]["reads"]) == 3
    assert merged["bytes_read"] > apart["bytes_read"]


# ---------------------------------------------------------------- end to end on the host --


@pytest.mark.parametrize("prefix", [b"", b"\x07", b"abc"], ids=["aligned", "shift1", "shift3"])
@pytest.mark.parametrize("bulk_bytes,request_bytes", [(8192, 4096), (1 << 16, 8192), (512 << 20, 16 << 20)])
@pytest.mark.parametrize("threads", [1, 3])
def test_host_gds_every_dtype_bit_exact(tmp_path, prefix, bulk_bytes, request_bytes, threads):
    path = every_dtype(tmp_path / "m.safetensors", prefix)
    loaded, got = host_gds(fst.open_checkpoint(path).select(None), threads, request_bytes, bulk_bytes)
    assert_same(got, reference(path))
    stats = loaded.stats
    assert stats["bytes_read"] % 4096 == 0 and stats["bytes_read"] >= stats["bytes"]
    assert "window(s), each placed by one fst_move_batch launch" in stats["reason"]


def test_host_gds_many_files_filters_and_shards(tmp_path):
    for k in range(4):
        write(tmp_path / f"part{k}.safetensors",
              [(f"p{k}.pad", "U8", [k + 1])]  # an odd start for every later tensor
              + [(f"p{k}.w{i}", "BF16" if i % 2 else "F32", [k + 1, 333 + i]) for i in range(12)],
              seed=k)
    ref = {}
    for f in sorted(tmp_path.glob("*.safetensors")):
        ref.update(reference(f))
    ckpt = fst.open_checkpoint(tmp_path)
    for keys in (["p1.*", "p3.w[13579]"], ["p0.w0", "p2.w11", "p3.w5"]):
        for gap in (0, 4096, 1 << 20):
            _, got = host_gds(ckpt.select(keys), 2, 8192, 1 << 16, merge_gap=gap)
            want = {k: v for k, v in ref.items() if k in got}
            assert len(want) == len(got) > 0
            assert_same(got, want)
    # Shards: rows of dimension 0, out of file order, one tensor twice.
    rows = [("p3.w4", 1, 2), ("p0.w1", 0, 1), ("p3.w4", 0, 4), ("p2.w0", 2, 1)]
    loaded = ckpt.select_rows(rows).start_gds(-1, _core.GdsOptions(threads=2, request_bytes=4096,
                                                                   bulk_bytes=8192)).wait()
    arrays = [t for _, t in loaded.to_dlpack([False] * len(fst._core.DTYPE_NAMES))]
    for (name, first, count), t in zip(rows, arrays):
        got = torch.from_dlpack(t)
        assert raw_bytes(got) == raw_bytes(ref[name][first:first + count]), name
        assert got.data_ptr() % 256 == 0


@pytest.fixture(scope="module")
def floats(tmp_path_factory):
    path = tmp_path_factory.mktemp("gds_dtype") / "m.safetensors"
    tensors = [(d, d, [3, 1001]) for d in list(TORCH) + ["F8_E8M0"]] + [("ints", "I32", [17])]
    return write(path, tensors, prefix=b"\x01")


@pytest.mark.parametrize("target", list(TORCH))
@pytest.mark.parametrize("bulk_bytes", [8192, 1 << 20])
def test_host_gds_converts_like_torch(floats, target, bulk_bytes):
    """dtype= through the GDS plan: conversions read the bulk buffer (tensors cut between
    windows at element boundaries when the buffer is small), bit for bit torch's .to()."""
    keys = None if target in ("F64", "F32", "F16", "BF16") else list(TORCH) + ["ints"]
    ref = fst.load(floats, framework="torch", keys=keys)
    selection = fst.open_checkpoint(floats).select(keys).with_dtypes(target, [])
    loaded, got = host_gds(selection, 2, 4096, bulk_bytes)
    assert "converted by one fst_convert_batch launch" in loaded.stats["reason"]
    for name, t in got.items():
        want = ref[name].to(TORCH[target]) if ref[name].is_floating_point() else ref[name]
        assert t.dtype == want.dtype, name
        assert raw_bytes(t) == raw_bytes(want), f"{name} -> {target}"
        assert t.data_ptr() % 256 == 0


def test_loads_one_after_another_share_a_gds_device(tmp_path):
    """The groups of a stream share one device: files stay open (registered), the bulk buffer
    is allocated once while it is large enough, and the bytes are still exact."""
    path = every_dtype(tmp_path / "m.safetensors", prefix=b"\x05")
    ref = reference(path)
    ckpt = fst.open_checkpoint(path)
    device = fst._core.GdsDevice(-1)
    groups = ckpt.select(None).split(3000)
    assert len(groups) > 3
    for group in groups:
        options = _core.GdsOptions(threads=2, request_bytes=4096, bulk_bytes=1 << 16)
        loaded = group.start_gds(-1, options, gds_device=device).wait()
        got = get_adapter("torch").export(loaded, "cpu")
        assert_same(got, {k: ref[k] for k in got})
    assert device.bulk_allocations == 1
    ckpt.select(None).start_gds(-1, _core.GdsOptions(threads=2, request_bytes=4096, bulk_bytes=1 << 20),
                                gds_device=device).wait()
    assert device.bulk_allocations == 2  # a larger window: a larger buffer


def test_a_gds_device_never_reads_a_replaced_file_through_its_old_registration(tmp_path):
    """A device that served a checkpoint keeps its files only for that checkpoint: another
    checkpoint of the same path (the file replaced meanwhile) is read from the new file."""
    path = tmp_path / "m.safetensors"
    old = write(tmp_path / "old.safetensors", [("a", "F32", [999]), ("b", "U8", [77])], seed=1)
    new = write(tmp_path / "new.safetensors", [("a", "F32", [999]), ("b", "U8", [77])], seed=2)
    device = fst._core.GdsDevice(-1)
    got = []
    for source in (old, new):
        os.replace(shutil.copy(source, tmp_path / "incoming"), path)
        options = _core.GdsOptions(threads=2, request_bytes=4096, bulk_bytes=1 << 16)
        loaded = fst.open_checkpoint(path).select(None).start_gds(-1, options, gds_device=device).wait()
        got.append({k: raw_bytes(v) for k, v in get_adapter("torch").export(loaded, "cpu").items()})
    assert got[0] == {k: raw_bytes(v) for k, v in reference(old).items()}
    assert got[1] == {k: raw_bytes(v) for k, v in reference(new).items()} != got[0]


def test_host_gds_file_that_shrank_is_an_error_and_leaks_nothing(tmp_path):
    path = write(tmp_path / "m.safetensors", [(f"t{i}", "F32", [4096]) for i in range(8)])
    selection = fst.open_checkpoint(path).select(None)
    os.truncate(path, os.path.getsize(path) // 2)
    fds, threads, _ = snapshot()
    for bulk in (8192, 1 << 20):
        with pytest.raises(fst.FstError, match="changed since its header was read"):
            selection.start_gds(-1, _core.GdsOptions(threads=2, request_bytes=4096, bulk_bytes=bulk)).wait()
    assert snapshot()[:2] == (fds, threads)


def test_host_gds_repeated_loads_leak_nothing(small):
    selection = fst.open_checkpoint(small).select(None)
    for _ in range(3):
        host_gds(selection)
    fds, threads, rss = snapshot()
    for _ in range(100):
        host_gds(selection, 2, 4096, 8192)
    fds2, threads2, rss2 = snapshot()
    assert (fds2, threads2) == (fds, threads)
    assert rss2 - rss < 16 << 20
