"""fst on a GPU machine: load throughput beside the other safetensors loaders and the machine's
own limits, a smoke load compared bit for bit, and whether torch's CUDA casts agree with its CPU
casts. `scripts/gpu_check.sh` runs all three; each also runs alone:

    python bench/bench_gpu.py load  [--device cuda:0] [--size 6GiB] [--files 3] [--dir DIR]
                                    [--wheels DIR] [--loaders a,b] [--out DIR]
    python bench/bench_gpu.py smoke [--device cuda:0] [--out DIR]
    python bench/bench_gpu.py casts [--device cuda:0] [--out DIR]

load: a synthetic BF16 checkpoint of --size in --files files, on a disk (never tmpfs) and read
once beforehand so that the page cache holds it. Every loader runs in a fresh process: the
device is initialised first, then the timer runs from the load call until a device
synchronisation after it. Each process times a first call and then up to --repeats further
calls (fewer when they would pass --budget seconds), and the median of the further calls is the
headline figure. A process that fails or passes --timeout seconds is reported as such, and the
next loader runs. Limits are measured the same way: a pinned host-to-device copy and parallel
preads from the page cache into pinned memory. Cold figures (page cache dropped before a fresh
process's first call) are taken only where dropping the cache is seen to work. Anchors (other
loaders) run when their cp312 wheels are in --wheels: each is installed with
`pip install --no-index --no-deps --target` into a folder of its own that only its own process
sees on PYTHONPATH. Results: <out>/bench_gpu.json and <out>/bench_gpu.md.

With --device cpu everything runs on the host (CPU tensors, JAX CPU arrays), so that the
benchmark's own code is tested without a GPU; its figures then mean little.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
GB = 1e9


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


# ------------------------------------------------------------------------------------------
# loaders: each returns (tensors, cleanup); the timer stops after sync_<framework>

LOADERS: dict[str, dict[str, Any]] = {}


def loader(name: str, framework: str, *, anchor: Optional[str] = None, note: str = "", cpu: bool = True):
    """Register a loader. `anchor` names the wheel group it needs (None: always present);
    `cpu`: whether it also runs with --device cpu."""

    def register(fn: Callable):
        LOADERS[name] = {"fn": fn, "framework": framework, "anchor": anchor, "note": note, "cpu": cpu}
        return fn

    return register


def jax_device(device: str):
    import jax

    platform_name, _, index = device.partition(":")
    return jax.local_devices(backend=platform_name)[int(index or 0)]


@loader("fst_torch", "torch", note="fst.load(framework='torch')")
def _fst_torch(files, device):
    import fst

    return fst.load(files, framework="torch", device=device), None


@loader("fst_jax", "jax", note="fst.load(framework='jax')")
def _fst_jax(files, device):
    import fst

    return fst.load(files, framework="jax", device=device), None


@loader("safetensors_load_file", "torch", note="safetensors.torch.load_file(device=...) per file")
def _st_load_file(files, device):
    from safetensors.torch import load_file

    out = {}
    for f in files:
        out.update(load_file(f, device=device))
    return out, None


@loader("safetensors_safe_open", "torch", note="safe_open(device=...).get_tensor per tensor")
def _st_safe_open(files, device):
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(f, framework="pt", device=device) as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out, None


@loader("safetensors_flax", "jax", note="safetensors.flax.load_file under jax.default_device")
def _st_flax(files, device):
    import jax
    from safetensors.flax import load_file

    out = {}
    dev = jax_device(device)
    # safetensors.flax puts arrays on JAX's default device; name it so that the arrays land
    # where the other loaders put theirs (a JAX without that context manager: moved after).
    if hasattr(jax, "default_device"):
        with jax.default_device(dev):
            for f in files:
                out.update(load_file(f))
    else:
        for f in files:
            out.update({k: jax.device_put(v, dev) for k, v in load_file(f).items()})
    return out, None


def _instanttensor(files, device, buffered):
    from instanttensor import BackendPolicy, safe_open

    index = int(device.partition(":")[2] or 0)
    kwargs = {"backend": BackendPolicy.BUFFERED} if buffered else {}
    out = {}
    with safe_open(files, framework="pt", device=index, **kwargs) as h:
        for name, t in h.tensors():
            out[name] = t
    return out, None


@loader("instanttensor_buffered", "torch", anchor="instanttensor", cpu=False,
        note="InstantTensor, BackendPolicy.BUFFERED (page cache reads)")
def _it_buffered(files, device):
    return _instanttensor(files, device, True)


@loader("instanttensor_direct", "torch", anchor="instanttensor", cpu=False,
        note="InstantTensor, default backend (O_DIRECT, bypasses the page cache)")
def _it_direct(files, device):
    return _instanttensor(files, device, False)


def _fastsafetensors(files, device, nogds):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    ld = SafeTensorsFileLoader(SingleGroup(), device, nogds=nogds)
    ld.add_filenames({0: list(files)})
    fb = ld.copy_files_to_device()
    out = {k: fb.get_tensor(k) for k in list(fb.key_to_rank_lidx.keys())}

    def cleanup():
        # Its tensors may be views of the loader's buffers: close only once they are unused.
        for obj in (fb, ld):
            try:
                obj.close()
            except Exception:
                pass

    return out, cleanup


@loader("fastsafetensors_nogds", "torch", anchor="fastsafetensors", cpu=False, note="fastsafetensors, nogds=True")
def _fs_nogds(files, device):
    return _fastsafetensors(files, device, True)


@loader("fastsafetensors_gds", "torch", anchor="fastsafetensors", cpu=False,
        note="fastsafetensors, nogds=False (cuFile; compatibility mode without nvidia-fs)")
def _fs_gds(files, device):
    return _fastsafetensors(files, device, False)


@loader("runai_streamer", "torch", anchor="runai", cpu=False,
        note="runai-model-streamer into host buffers, then .to(device) per tensor")
def _runai(files, device):
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_files(list(files), device=device)
        for name, t in s.get_tensors():
            # The streamer reuses its host buffers: each tensor is copied out before the next.
            out[name] = t.to(device) if t.device.type == "cpu" else t.clone()
    return out, None


@loader("kvikio_raw", "cupy", anchor="kvikio", cpu=False,
        note="kvikio CuFile.read of whole files into cupy buffers (raw bytes, no tensors)")
def _kvikio(files, device):
    import cupy
    import kvikio

    out = {}
    with cupy.cuda.Device(int(device.partition(":")[2] or 0)):
        for f in files:
            buf = cupy.empty(os.path.getsize(f), dtype=cupy.uint8)
            with kvikio.CuFile(f, "r") as h:
                h.read(buf)
            out[f] = buf
    return out, None


# The order loaders run in: what the targets compare first (fst, InstantTensor's buffered mode,
# safetensors), the slowest last, so that a run cut short by --deadline still has those rows.
ORDER = ["fst_torch", "fst_jax", "instanttensor_buffered", "safetensors_load_file", "safetensors_safe_open",
         "runai_streamer", "kvikio_raw", "fastsafetensors_nogds", "instanttensor_direct", "fastsafetensors_gds",
         "safetensors_flax"]
assert sorted(ORDER) == sorted(LOADERS)

# Wheels each anchor needs, by distribution name as it appears in a wheel's file name.
ANCHOR_WHEELS = {
    "instanttensor": ["instanttensor"],
    "fastsafetensors": ["fastsafetensors"],
    "runai": ["runai_model_streamer", "humanize"],
    "kvikio": ["kvikio_cu13", "libkvikio_cu13", "rapids_logger"],
}


# ------------------------------------------------------------------------------------------
# limits, timed like the loaders


def limit_h2d(files, device, nbytes):
    """Pinned host memory -> device, one copy of `nbytes` (the machine's copy-engine bound)."""
    import torch

    state = limit_h2d.__dict__.setdefault("state", {})
    if "src" not in state:
        state["src"] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
        state["dst"] = torch.empty(nbytes, dtype=torch.uint8, device=device)
    state["dst"].copy_(state["src"], non_blocking=True)
    return {"copy": state["dst"]}, None


PREAD_CHUNK = 16 << 20


def pread_slabs(device: str, threads: int) -> dict:
    """The pread limit's pinned slabs, allocated once per process."""
    import torch

    state = limit_pread.__dict__.setdefault("state", {})
    if "slabs" not in state:
        pin = is_cuda(device)
        state["slabs"] = [torch.empty(PREAD_CHUNK, dtype=torch.uint8, pin_memory=pin) for _ in range(threads)]
    return state


def limit_pread(files, device, threads):
    """Parallel preads of every file from the page cache into pinned memory: `threads` Python
    threads (os.preadv releases the GIL, so the reads run in parallel in the kernel), each with
    a pinned slab of its own that it reads 16 MiB chunks into, over and over. The slabs are
    reused so that this measures the reads themselves, as a staging ring does."""
    chunk = PREAD_CHUNK
    state = pread_slabs(device, threads)
    work = []
    for f in files:
        size = os.path.getsize(f)
        work += [(f, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    done = [0] * threads
    errors: list[BaseException] = []

    def reader(k: int) -> None:
        view = memoryview(state["slabs"][k].numpy())
        fds: dict[str, int] = {}
        try:
            for f, off, n in work[k::threads]:
                fd = fds.get(f)
                if fd is None:
                    fd = fds[f] = os.open(f, os.O_RDONLY)
                got = os.preadv(fd, [view[:n]], off)
                if got != n:
                    raise OSError(f"short read of {f} at {off}: {got} of {n}")
                done[k] += got
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            for fd in fds.values():
                os.close(fd)

    pool = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return {"bytes": sum(done)}, None


# ------------------------------------------------------------------------------------------
# one process: one loader (or limit), a first call and the further ones


def init_device(framework: str, device: str) -> None:
    """Initialise the device outside the timed calls: a CUDA context for torch, JAX's client."""
    if framework == "jax":
        import jax
        import jax.numpy as jnp

        jax.block_until_ready(jax.device_put(jnp.zeros(1), jax_device(device)))
    if framework in ("torch", "cupy") or is_cuda(device):
        import torch

        torch.zeros(1, device=device)
        if is_cuda(device):
            torch.cuda.synchronize(device)
    if framework == "cupy":
        import cupy

        cupy.zeros(1)
        cupy.cuda.runtime.deviceSynchronize()


def sync(framework: str, device: str, out: dict) -> None:
    if framework == "jax":
        import jax

        jax.block_until_ready(list(out.values()))
    elif framework == "cupy":
        import cupy

        cupy.cuda.runtime.deviceSynchronize()
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def nbytes_of(out: dict) -> tuple[int, int, list[str]]:
    """Bytes, count and the devices of the loaded values."""
    total = 0
    devices = set()
    for v in out.values():
        if isinstance(v, int):  # limit_pread reports its bytes
            total += v
            continue
        total += int(v.nbytes)
        dev = getattr(v, "device", None)
        if callable(dev):  # cupy
            dev = dev()
        if dev is None and hasattr(v, "devices"):  # jax
            dev = ",".join(sorted(str(d) for d in v.devices()))
        devices.add(str(dev))
    return total, len(out), sorted(devices)


def child(name: str, files: list[str], device: str, repeats: int, budget: float, limit_bytes: int) -> dict:
    if name == "limit_h2d":
        framework, fn = "torch", lambda f, d: limit_h2d(f, d, limit_bytes)
    elif name == "limit_pread":
        framework, fn = "torch", lambda f, d: limit_pread(f, d, os.cpu_count() or 1)
    else:
        framework, fn = LOADERS[name]["framework"], LOADERS[name]["fn"]
    init_device(framework, device)
    row: dict[str, Any] = {"times": []}
    # A limit is the transfer itself: its buffers are made before the timed calls (by an
    # untimed copy for the pinned copy; the pread limit only allocates, so that a cold first
    # call still reads a cold cache).
    if name == "limit_h2d":
        out, _ = fn(files, device)
        sync(framework, device, out)
        del out
    elif name == "limit_pread":
        pread_slabs(device, os.cpu_count() or 1)
    start = time.perf_counter()
    for call in range(1 + repeats):
        if call >= 2 and time.perf_counter() - start > budget:
            break  # a slow loader: fewer further calls, the row says how many
        t0 = time.perf_counter()
        out, cleanup = fn(files, device)
        sync(framework, device, out)
        row["times"].append(time.perf_counter() - t0)
        if call == 0:
            row["bytes"], row["tensors"], row["devices"] = nbytes_of(out)
        if name == "kvikio_raw":
            try:
                import kvikio.defaults

                row["kvikio_compat_mode"] = str(kvikio.defaults.get("compat_mode"))
            except Exception as exc:
                row["kvikio_compat_mode"] = f"unknown ({exc!r})"
        if name.startswith("fst"):
            import fst

            stats = fst.last_load_stats() or {}
            row["backend"], row["reason"] = stats.get("backend"), stats.get("reason")
        if cleanup:
            cleanup()
        del out
        gc.collect()
        # Each call allocates its device memory afresh, as one real load does.
        if framework == "torch" and is_cuda(device):
            import torch

            torch.cuda.empty_cache()
    return row


# ------------------------------------------------------------------------------------------
# the parent: data, anchors, cold detection, one process per row


def fstype_of(path: Path) -> str:
    from fst.benchmark import filesystem_of

    return filesystem_of(path)["type"]


MEMORY_FS = {"tmpfs", "ramfs", "devtmpfs"}


def pick_data_dir(explicit: Optional[str], need: int) -> tuple[Path, str, list[str]]:
    """A folder on a disk with room for the data: --dir, else the repository's build/ (kept
    between runs, ignored by git), else /var/tmp. Memory-backed file systems would make the
    page cache and the file the same memory, and the files would eat the memory the loads
    need."""
    tried = []
    candidates = [Path(explicit)] if explicit else [REPO / "build" / "bench-gpu-data", Path("/var/tmp/fst-bench-gpu")]
    for c in candidates:
        probe = c
        while not probe.exists():
            probe = probe.parent
        fstype = fstype_of(probe)
        free = shutil.disk_usage(probe).free
        if fstype in MEMORY_FS and not explicit:
            tried.append(f"{c}: {fstype} (memory)")
            continue
        if free < need + (1 << 30) and not (c / "DONE").exists():
            tried.append(f"{c}: {free / GB:.1f} GB free, {need / GB:.1f} GB needed")
            continue
        return c, fstype, tried
    raise SystemExit("no folder on a disk with room for the data: " + "; ".join(tried))


def make_data(folder: Path, size: int, files: int) -> list[str]:
    """The checkpoint, written once: a DONE file naming its size makes later runs reuse it."""
    from fst.benchmark import make_checkpoint

    stamp = folder / "DONE"
    want = f"{size} {files}\n"
    if stamp.exists() and stamp.read_text() == want:
        return sorted(str(p) for p in folder.glob("*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    # Not synced here: the warm runs read the page cache, and the cold ones' drop_page_cache
    # writes the files out itself before dropping them.
    ck = make_checkpoint(folder, size, files=files, dtype="BF16")
    stamp.write_text(want)
    return [str(p) for p in ck.files]


def wheel_for(folder: Path, dist: str) -> Optional[Path]:
    """The newest wheel of `dist` in `folder` that this Python can install."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    found = []
    for w in folder.glob("*.whl"):
        name, _, rest = w.name.partition("-")
        if name.lower().replace("-", "_").replace(".", "_") != dist:
            continue
        py_tags = w.name.split("-")[-3]
        if any(t.startswith("cp") and t != tag for t in py_tags.split(".")) and "abi3" not in w.name:
            continue
        found.append(w)
    return sorted(found)[-1] if found else None


def install_anchor(anchor: str, wheels: Optional[Path], into: Path) -> tuple[Optional[Path], str]:
    """Install the anchor's wheels into a folder of its own; (folder, "") or (None, why not)."""
    if wheels is None:
        return None, "no --wheels folder"
    need = ANCHOR_WHEELS[anchor]
    found = {d: wheel_for(wheels, d) for d in need}
    if found[need[0]] is None:
        return None, f"no {need[0]} cp{sys.version_info.major}{sys.version_info.minor} wheel in {wheels}"
    target = into / anchor
    chosen = sorted(str(w) for w in found.values() if w)
    marker = target / ".fst-wheels"
    if marker.exists() and marker.read_text() == "\n".join(chosen):
        return target, ""
    shutil.rmtree(target, ignore_errors=True)
    # --no-deps: their other needs (torch, numpy, cupy) are the machine's own, which a
    # resolver confined to --target would try to install again.
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target), *chosen]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        return None, f"pip install failed: {(p.stderr or p.stdout).strip()[-400:]}"
    marker.write_text("\n".join(chosen))
    missing = [d for d, w in found.items() if w is None]
    return target, (f"installed without {', '.join(missing)} (no wheel)" if missing else "")


def drop_cache_works(files: list[str]) -> tuple[bool, str]:
    """Drop the cache and look: only a measured residency says the cold figures are cold."""
    from fst.benchmark import drop_page_cache, warm_page_cache

    res = drop_page_cache(files)
    ok = res["residency"] < 0.05
    why = f"after dropping ({', '.join(res['methods']) or 'nothing worked'}): {res['residency']:.0%} still cached"
    warm_page_cache(files)
    return ok, why


# Loader processes running now. They run in sessions of their own, out of reach of a signal
# sent to this process's group, so a TERM to this benchmark ends them first.
RUNNING: set[int] = set()


def end_children(signum, _frame) -> None:
    for pid in list(RUNNING):
        try:
            os.killpg(pid, 9)
        except OSError:
            pass
    sys.exit(128 + signum)


def result_line(stdout: str) -> Optional[dict]:
    """The child's result: its last line that is a JSON object with times (loaders may print
    lines of their own to stdout)."""
    for line in reversed(stdout.strip().splitlines()):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "times" in row:
            return row
    return None


def run_child(args, name: str, files: list[str], mode: str, extra_path: Optional[Path]) -> dict:
    env = dict(os.environ)
    if extra_path is not None:  # this loader's wheels, seen by this process only
        env["PYTHONPATH"] = os.pathsep.join(p for p in [str(extra_path), env.get("PYTHONPATH", "")] if p)
    if name == "kvikio_raw":
        env.setdefault("KVIKIO_NTHREADS", str(os.cpu_count() or 1))
    repeats = 0 if mode == "cold" else args.repeats
    timeout = args.timeout
    if args.deadline:  # never past the deadline: a cut-off row still says what happened
        timeout = max(5.0, min(timeout, args.deadline - (time.perf_counter() - args.started)))
    cmd = [sys.executable, str(Path(__file__).resolve()), "_child", name, "--device", args.device,
           "--repeats", str(repeats), "--budget", str(args.budget), "--limit-bytes", str(args.limit_bytes)]
    t0 = time.perf_counter()
    # A session of its own, so that a loader past its time is killed with every process it
    # started (some anchors run worker processes).
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, start_new_session=True)
    RUNNING.add(p.pid)
    try:
        stdout, stderr = p.communicate(json.dumps(files), timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, 9)
        except OSError:
            pass
        stdout, stderr = p.communicate()
        row = result_line(stdout)
        if row is not None:  # measured, then stuck on the way out: the figures stand, and so does that
            row["process_s"] = round(time.perf_counter() - t0, 2)
            row["exit"] = f"still running {timeout:.0f} s after starting: killed after it printed its result"
            return row
        return {"status": "timeout", "error": f"passed {timeout:.0f} s; stderr: {stderr.strip()[-300:]}"}
    finally:
        RUNNING.discard(p.pid)
    wall = time.perf_counter() - t0
    row = result_line(stdout)
    if p.returncode != 0 or row is None:
        err = [l for l in (stderr or stdout).strip().splitlines() if l.strip()] or [f"exit status {p.returncode}"]
        # The exception's own line first (it ends a traceback), then the lines before it.
        text = err[-1].strip() + (" <- " + " | ".join(l.strip() for l in err[-4:-1]) if len(err) > 1 else "")
        return {"status": "failed", "error": text[:600], "exit_status": p.returncode, "process_s": round(wall, 2)}
    row["process_s"] = round(wall, 2)
    return row


def finish_row(row: dict, expect_bytes: Optional[int], expect_tensors: Optional[int]) -> dict:
    times = row.get("times") or []
    if row.get("status", "ok") != "ok" or not times:
        return row
    row["status"] = "ok"
    nbytes = row["bytes"]
    row["first_s"] = times[0]
    row["first_GBps"] = nbytes / times[0] / GB if times[0] else None
    further = times[1:]
    if further:
        row["median_s"] = statistics.median(further)
        row["median_GBps"] = nbytes / row["median_s"] / GB
        row["further_calls"] = len(further)
    if expect_bytes is not None and nbytes != expect_bytes:
        row["status"] = "incomplete"
        row["error"] = f"loaded {nbytes} bytes in {row.get('tensors')} values, expected {expect_bytes}"
    elif expect_tensors is not None and row.get("tensors") not in (None, expect_tensors):
        row["status"] = "incomplete"
        row["error"] = f"loaded {row.get('tensors')} tensors, expected {expect_tensors}"
    return row


def machine(device: str) -> dict:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(), "device": device}
    try:
        import torch

        info["torch"] = torch.__version__
        if is_cuda(device) and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(device)
    except Exception as exc:
        info["torch"] = f"not usable: {exc!r}"
    for mod in ("jax", "safetensors", "fst"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:
            info[mod] = f"not usable: {exc!r}"
    return info


def cmd_load(args) -> int:
    from fst.benchmark import parse_size, warm_page_cache

    signal.signal(signal.SIGTERM, end_children)

    started = args.started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = parse_size(args.size)
    folder, fstype, tried = pick_data_dir(args.dir, size)
    log(f"data: {folder} ({fstype})" + (f"; passed over: {'; '.join(tried)}" if tried else ""))
    t0 = time.perf_counter()
    files = make_data(folder, size, args.files)
    made_s = time.perf_counter() - t0
    residency = warm_page_cache(files)
    file_bytes = sum(os.path.getsize(f) for f in files)
    import fst

    ck = fst.open_checkpoint(files)
    expect_bytes, expect_tensors = ck.nbytes, len(ck.names())
    log(f"{len(files)} files, {expect_tensors} tensors, {expect_bytes / GB:.2f} GB of tensors "
        f"(ready in {made_s:.1f} s, {residency:.0%} in the page cache)")

    result: dict[str, Any] = {
        "machine": machine(args.device),
        "data": {"folder": str(folder), "fstype": fstype, "passed_over": tried, "files": len(files),
                 "file_bytes": file_bytes, "tensor_bytes": expect_bytes, "tensors": expect_tensors,
                 "dtype": "BF16", "page_cache_residency": residency},
        "config": {"repeats": args.repeats, "budget_s": args.budget, "timeout_s": args.timeout,
                   "limit_h2d_bytes": args.limit_bytes},
        "rows": [],
        "skipped": [],
    }
    json_path, md_path = out / "bench_gpu.json", out / "bench_gpu.md"

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        md_path.write_text(markdown(result) + "\n")

    wanted = [s for s in args.loaders.split(",") if s] if args.loaders else None
    names = ["limit_h2d", "limit_pread", *ORDER]
    if wanted:
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"unknown loaders: {', '.join(unknown)}; known: {', '.join(names)}")
        names = [n for n in names if n in wanted]
    anchors_dir = Path(args.anchors_dir) if args.anchors_dir else folder.parent / "bench-gpu-anchors"
    wheels = Path(args.wheels) if args.wheels else None
    installed: dict[str, tuple[Optional[Path], str]] = {}

    rows_to_run = []
    for name in names:
        spec = LOADERS.get(name, {})
        if not is_cuda(args.device) and (name == "limit_h2d" or not spec.get("cpu", True)):
            result["skipped"].append({"loader": name, "reason": "GPU only"})
            continue
        path = None
        if spec.get("anchor"):
            a = spec["anchor"]
            if a not in installed:
                installed[a] = install_anchor(a, wheels, anchors_dir)
            path, why = installed[a]
            if path is None:
                result["skipped"].append({"loader": name, "reason": why})
                continue
            if why:
                log(f"{name}: {why}")
        rows_to_run.append((name, path))
    save()

    def out_of_time(name: str, mode: str) -> bool:
        left = args.deadline - (time.perf_counter() - started)
        if args.deadline and left < 5:
            result["skipped"].append({"loader": name, "reason": f"{mode}: out of time (--deadline {args.deadline:.0f} s)"})
            save()
            return True
        return False

    for name, path in rows_to_run:
        if out_of_time(name, "warm"):
            continue
        row = run_child(args, name, files, "warm", path)
        if name == "limit_h2d":
            row = finish_row(row, args.limit_bytes, None)
        elif name == "limit_pread":
            row = finish_row(row, file_bytes, None)
        else:
            # kvikio reads whole files, header included; the others load every tensor.
            row = finish_row(row, file_bytes if name == "kvikio_raw" else expect_bytes,
                             None if name == "kvikio_raw" else expect_tensors)
        row.update({"loader": name, "mode": "warm", "note": LOADERS.get(name, {}).get("note", LIMIT_NOTES.get(name))})
        result["rows"].append(row)
        log(line_of(row))
        save()

    cold = [c for c in args.cold.split(",") if c and c in dict(rows_to_run)]
    if cold:
        works, why = drop_cache_works(files)
        result["cold"] = {"works": works, "how": why}
        log(f"cold: {'measured' if works else 'not measured'}: {why}")
        from fst.benchmark import drop_page_cache

        for name in cold if works else []:
            if out_of_time(name, "cold"):
                continue
            dropped = drop_page_cache(files)
            row = run_child(args, name, files, "cold", dict(rows_to_run)[name])
            row = finish_row(row, file_bytes if name in ("kvikio_raw", "limit_pread") else expect_bytes, None)
            row.update({"loader": name, "mode": "cold", "residency_before": dropped["residency"],
                        "note": LOADERS.get(name, {}).get("note", LIMIT_NOTES.get(name))})
            result["rows"].append(row)
            log(line_of(row))
            warm_page_cache(files)
            save()
        # The residency the kernel reports is all that says a drop worked; where the storage
        # limit reads a "cold" cache about as fast as a warm one, it did not.
        rate = {r["mode"]: r.get("median_GBps" if r["mode"] == "warm" else "first_GBps")
                for r in result["rows"] if r["loader"] == "limit_pread" and r.get("status") == "ok"}
        if rate.get("cold") and rate.get("warm") and rate["cold"] > 0.5 * rate["warm"]:
            result["cold"]["doubt"] = (f"cold preads ran at {rate['cold']:.1f} GB/s against {rate['warm']:.1f} GB/s "
                                       "warm: the page cache was probably not dropped")
    save()
    print(markdown(result))
    # fst's rows and the limits must stand; another loader failing is its own affair (reported).
    ours = [r for r in result["rows"] if r["loader"].startswith(("fst", "limit"))]
    return 0 if all(r.get("status") == "ok" for r in ours) else 1


LIMIT_NOTES = {
    "limit_h2d": "limit: pinned host -> device copy (torch copy_, non_blocking)",
    "limit_pread": "limit: parallel os.preadv (Python threads, one per CPU, 16 MiB) from the page cache into pinned slabs",
}


def line_of(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['loader']:<24} {row['mode']:<4} {row.get('status')}: {row.get('error')}"
    med = f"{row['median_GBps']:7.2f} GB/s (median of {row['further_calls']})" if "median_GBps" in row else ""
    return f"{row['loader']:<24} {row['mode']:<4} first {row['first_GBps']:7.2f} GB/s  {med}"


def markdown(result: dict) -> str:
    m, d = result["machine"], result["data"]
    lines = [
        f"GPU: {m.get('gpu', m['device'])}; {m['cpus']} CPUs; Python {m['python']}, torch {m.get('torch')}, "
        f"jax {m.get('jax')}, safetensors {m.get('safetensors')}, fst {m.get('fst')}",
        f"Data: {d['tensor_bytes'] / GB:.2f} GB of {d['dtype']} in {d['files']} files, {d['tensors']} tensors, "
        f"on {d['fstype']} ({d['folder']}), {d['page_cache_residency']:.0%} in the page cache before the runs.",
        "Each loader in a fresh process, device initialised first, timer stopped after a device "
        "synchronisation; GB/s of tensor bytes (file bytes for kvikio and the pread limit).",
        "",
        "| loader | mode | first call GB/s | median GB/s (further calls) | status | what |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        first = f"{r['first_GBps']:.2f}" if r.get("first_GBps") else ""
        med = f"{r['median_GBps']:.2f} ({r['further_calls']})" if r.get("median_GBps") else ""
        status = r.get("status", "?")
        if status != "ok":
            status += ": " + str(r.get("error", ""))[:160].replace("|", "/")
        what = r.get("note") or ""
        if r.get("backend"):
            what += f"; backend {r['backend']}"
        lines.append(f"| {r['loader']} | {r['mode']} | {first} | {med} | {status} | {what} |")
    for s in result["skipped"]:
        lines.append(f"| {s['loader']} | | | | skipped: {s['reason'][:160]} | |")
    if "cold" in result:
        lines.append("")
        lines.append(f"Cold runs: {'measured' if result['cold']['works'] else 'not measured'} ({result['cold']['how']}).")
        if result["cold"].get("doubt"):
            lines.append(f"Doubt: {result['cold']['doubt']}.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# smoke: a small load onto the device, compared bit for bit with safetensors

SMOKE_DTYPES = ["BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2", "I64", "I32", "I8", "U8", "BOOL"]
ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
            "I8": 1, "U8": 1, "BOOL": 1}


def write_smoke_checkpoint(folder: Path, mib: int) -> list[str]:
    """Two files of random bytes in every dtype, tensors at odd offsets (each file starts with a
    3-byte tensor), empty and scalar tensors included, written by hand so that nothing aligns
    them."""
    import numpy as np

    rng = np.random.default_rng(7)
    files = []
    for k in range(2):
        entries: list[tuple[str, str, list[int]]] = [(f"f{k}.pad", "U8", [3]), (f"f{k}.empty", "F32", [0, 5]),
                                                     (f"f{k}.scalar", "BF16", [])]
        for i, dt in enumerate(SMOKE_DTYPES):
            entries.append((f"f{k}.t{i}.{dt.lower()}", dt, [3 + i, 5 + k]))
        per_big = (mib << 20) // 2 // 4
        entries += [(f"f{k}.big{i}", "BF16", [per_big // 4096 // 2, 4096]) for i in range(4)]
        header, blobs, off = {}, [], 0
        for name, dt, shape in entries:
            n = int(np.prod(shape)) * ITEMSIZE[dt] if shape else ITEMSIZE[dt]
            data = rng.integers(0, 256, n, dtype=np.uint8)
            if dt == "BOOL":
                data &= 1
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}
            blobs.append(data.tobytes())
            off += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        path = folder / f"smoke-{k}.safetensors"
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for b in blobs:
                f.write(b)
        files.append(str(path))
    return files


def runtime_info_within(seconds: float) -> Any:
    """fst.runtime_info(), which opens the cuFile driver; where that open hangs, say so and go
    on (a daemon thread does not hold the process at exit)."""
    import fst

    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["info"] = fst.runtime_info()
        except Exception as exc:
            box["info"] = f"failed: {type(exc).__name__}: {exc}"

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(seconds)
    return json.loads(json.dumps(box["info"], default=str)) if "info" in box else f"did not return in {seconds:.0f} s"


def cmd_smoke(args) -> int:
    # F64 and I64 tensors stay 64-bit in JAX only with x64 on (read when JAX is imported).
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    import numpy as np
    import torch
    from safetensors.torch import load_file

    import fst

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"device": args.device, "checks": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="fst-smoke-", dir=args.dir or None) as tmp:
        files = write_smoke_checkpoint(Path(tmp), args.mib)
        ref: dict[str, torch.Tensor] = {}
        for f in files:
            ref.update(load_file(f, device="cpu"))

        def as_bytes(t) -> bytes:
            t = t.detach().to("cpu").contiguous()
            return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""

        want = {k: as_bytes(v) for k, v in ref.items()}

        def check(what: str, fn: Callable[[], dict], to_bytes: Callable[[Any], bytes], where: Callable[[Any], str]):
            nonlocal ok
            entry: dict[str, Any] = {"what": what}
            t0 = time.perf_counter()
            try:
                got = fn()
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                bad = sorted(k for k in want if k not in got or to_bytes(got[k]) != want[k])
                extra = sorted(set(got) - set(want))
                places = sorted({where(v) for v in got.values()})
                entry.update({"tensors": len(got), "mismatched": bad[:10], "unexpected": extra[:10], "devices": places})
                entry["ok"] = not bad and not extra
                stats = fst.last_load_stats() or {}
                entry["backend"] = stats.get("backend")
            except Exception as exc:
                entry.update({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:600]})
            ok = ok and entry["ok"]
            report["checks"].append(entry)
            log(f"smoke {what}: {'ok' if entry['ok'] else 'FAILED'} {json.dumps(entry)[:400]}")

        check("fst.load torch", lambda: fst.load(files, framework="torch", device=args.device),
              as_bytes, lambda v: str(v.device))

        def safe_open_all():
            got = {}
            for f in files:
                with fst.safe_open(f, framework="pt", device=args.device) as h:
                    for k in h.keys():
                        got[k] = h.get_tensor(k)
            return got

        check("fst.safe_open torch", safe_open_all, as_bytes, lambda v: str(v.device))

        def jax_bytes(a) -> bytes:
            arr = np.asarray(a)
            return arr.reshape(-1).view(np.uint8).tobytes() if arr.size else b""

        def jax_where(a) -> str:
            return ",".join(sorted(str(d) for d in a.devices()))

        check("fst.load jax", lambda: fst.load(files, framework="jax", device=args.device), jax_bytes, jax_where)
    report["runtime_info"] = runtime_info_within(10.0)
    report["ok"] = ok
    (out / "smoke.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------
# casts: torch's casts on the device against its casts on the CPU (the reference fst follows)

CAST_TYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"]
TORCH_NAME = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
UINT = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
SIGNED = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}
WIDTH = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}


def cast_sources(dt: str, samples: int):
    """Every bit pattern of an 8- or 16-bit type; for F32/F64 the edge cases (NaN payloads,
    +-inf, values past every narrower type's range, ties at each narrower type's precision,
    subnormals of every width) and random bit patterns."""
    import numpy as np

    w = WIDTH[dt]
    if w <= 2:
        return np.arange(1 << (8 * w), dtype=UINT[w])
    rng = np.random.default_rng(11)
    ftype = np.float32 if w == 4 else np.float64
    special = [np.inf, -np.inf, 0.0, -0.0, 448.0, 449.0, 464.0, 465.0, 480.0, 57344.0, 61440.0, 65504.0,
               65519.0, 65520.0, 3.4e38, -3.4e38, 1e-8, 6e-8, 1e-40, -1e-40, 5e-324, 1e-310, 1.0 + 2**-8,
               1.0 + 2**-9, 1.0 + 2**-11, 1.0 + 2**-12, 1.0 + 3 * 2**-9, 1.0 + 3 * 2**-12, 2.0**-7, 2.0**-9,
               2.0**-10, 2.0**-14, 2.0**-16, 2.0**-24, 2.0**-25, 2.0**-126, 2.0**-133, 2.0**-149, 2.0**-150]
    vals = np.array([x for x in special if np.isfinite(ftype(x)) or np.isinf(x)], dtype=ftype)
    bits = [vals.view(UINT[w]), (-vals).view(UINT[w])]
    exp_bits = 8 if w == 4 else 11
    mant = 8 * w - 1 - exp_bits
    nan_base = ((1 << exp_bits) - 1) << mant
    payloads = np.array([1, 2, 3, (1 << (mant - 1)), (1 << (mant - 1)) | 1, (1 << mant) - 1,
                         (1 << 13) | 1, 1 << 16, (1 << 29) if w == 8 else 1 << 20], dtype=np.uint64)
    nans = (np.uint64(nan_base) | payloads).astype(UINT[w])
    bits += [nans, nans | np.array(1 << (8 * w - 1), dtype=np.uint64).astype(UINT[w])]
    # Ties and near-ties around every narrower precision, at many magnitudes: the low bits of a
    # random value set to exactly half a unit of the narrower type, plus or minus one.
    base = rng.integers(0, np.iinfo(UINT[w]).max, samples // 2, dtype=UINT[w], endpoint=True)
    ties = []
    for drop in (mant - 10, mant - 7, mant - 3, mant - 2, mant - 23 if w == 8 else mant - 7):
        half = np.array(1 << (drop - 1), dtype=np.uint64).astype(UINT[w])
        mask = np.array(~((1 << drop) - 1) & ((1 << (8 * w)) - 1), dtype=np.uint64).astype(UINT[w])
        t = (base[: samples // 16] & mask) | half
        ties += [t, t + np.array(1, dtype=UINT[w]), t - np.array(1, dtype=UINT[w])]
    bits += ties + [base]
    return np.concatenate(bits)


def cmd_casts(args) -> int:
    import torch

    from fst import _core

    pairs = [(a, b) for a in CAST_TYPES for b in CAST_TYPES if a != b and _core.conversion_supported(a, b)]
    report: dict[str, Any] = {"device": args.device, "torch": torch.__version__, "pairs": []}
    total_disagree = 0
    for src, dst in pairs:
        try:
            entry = one_cast(src, dst, args.device, args.samples)
        except Exception as exc:  # a cast the device lacks: recorded, the other pairs go on
            entry = {"src": src, "dst": dst, "error": f"{type(exc).__name__}: {exc}"[:300], "disagree": None}
        total_disagree += entry["disagree"] or 0
        report["pairs"].append(entry)
    report["pairs_checked"] = sum(1 for p in report["pairs"] if p["disagree"] is not None)
    report["pairs_agree"] = sum(1 for p in report["pairs"] if p["disagree"] == 0)
    report["pairs_failed"] = [f"{p['src']}->{p['dst']}" for p in report["pairs"] if p["disagree"] is None]
    report["values_disagree"] = int(total_disagree)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "casts.json").write_text(json.dumps(report, indent=1) + "\n")
    for p in report["pairs"]:
        if p["disagree"] is None:
            log(f"{p['src']:>8} -> {p['dst']:<8} failed: {p['error']}")
            continue
        log(f"{p['src']:>8} -> {p['dst']:<8} {p['values']:>9} values: "
            + ("agree" if not p["disagree"] else f"{p['disagree']} disagree ({p['disagree_nan_payload_only']} NaN payloads only)"))
    print(json.dumps({k: report[k] for k in ("device", "torch", "pairs_checked", "pairs_agree", "values_disagree",
                                             "pairs_failed")}))
    return 1 if report["pairs_failed"] else 0


def one_cast(src: str, dst: str, device: str, samples: int) -> dict:
    import numpy as np
    import torch

    bits = cast_sources(src, samples)
    # Bits travel as signed integers of the same width: torch.from_numpy and .numpy()
    # take those on every torch release, unlike uint16/32/64.
    x = torch.from_numpy(bits.view(SIGNED[WIDTH[src]])).view(getattr(torch, TORCH_NAME[src]))
    target = getattr(torch, TORCH_NAME[dst])
    cpu = x.to(target)
    dev = x.to(device).to(target).to("cpu")
    wd = WIDTH[dst]
    a = cpu.view(getattr(torch, SIGNED[wd])).numpy()
    b = dev.view(getattr(torch, SIGNED[wd])).numpy()
    diff = np.nonzero(a != b)[0]
    both_nan = 0
    if len(diff):  # float8 has no isnan on every release: look through float32
        idx = torch.from_numpy(diff)
        both_nan = int((torch.isnan(cpu[idx].float()) & torch.isnan(dev[idx].float())).sum())
    entry = {"src": src, "dst": dst, "values": int(bits.size), "exhaustive": WIDTH[src] <= 2,
             "disagree": int(len(diff)), "disagree_nan_payload_only": both_nan}
    if len(diff):
        entry["examples"] = [{"src": f"0x{int(bits[i]):0{2 * WIDTH[src]}x}",
                              "cpu": f"0x{int(a[i]) & ((1 << 8 * wd) - 1):0{2 * wd}x}",
                              "device": f"0x{int(b[i]) & ((1 << 8 * wd) - 1):0{2 * wd}x}"} for i in diff[:5]]
    return entry


# ------------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:  # one loader in this fresh process; files come on stdin
        ap = argparse.ArgumentParser()
        ap.add_argument("name")
        ap.add_argument("--device", required=True)
        ap.add_argument("--repeats", type=int, required=True)
        ap.add_argument("--budget", type=float, required=True)
        ap.add_argument("--limit-bytes", type=int, required=True)
        a = ap.parse_args(argv[1:])
        files = json.loads(sys.stdin.read())
        print(json.dumps(child(a.name, files, a.device, a.repeats, a.budget, a.limit_bytes), default=str))
        return 0

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    default_out = os.environ.get("OUT") or str(REPO / "bench" / "out")

    lp = sub.add_parser("load", help="load throughput of fst, the other loaders and the limits")
    lp.add_argument("--device", default="cuda:0", help="cuda:N, or cpu to test this script without a GPU")
    lp.add_argument("--size", default="6GiB", help="tensor bytes of the checkpoint (default 6GiB)")
    lp.add_argument("--files", type=int, default=3)
    lp.add_argument("--dir", default=None, help="data folder (default: the repo's build/, else /var/tmp)")
    lp.add_argument("--wheels", default=None, help="folder of cp312 wheels of the other loaders")
    lp.add_argument("--anchors-dir", default=None, help="where their wheels are installed (default: beside the data)")
    lp.add_argument("--loaders", default=None, help="comma-separated subset of: limit_h2d, limit_pread, "
                    + ", ".join(LOADERS))
    lp.add_argument("--repeats", type=int, default=3, help="further calls after the first (default 3)")
    lp.add_argument("--budget", type=float, default=8.0,
                    help="seconds of calls in one process after which no further call starts (default 8)")
    lp.add_argument("--deadline", type=float, default=0,
                    help="seconds for the whole run (0: none); rows that would pass it are skipped")
    lp.add_argument("--timeout", type=float, default=60.0, help="seconds a loader's process may take")
    lp.add_argument("--limit-bytes", type=int, default=2 << 30, help="bytes of the pinned copy limit")
    lp.add_argument("--cold", default="fst_torch,instanttensor_buffered,limit_pread",
                    help="loaders also timed cold, where dropping the page cache works")
    lp.add_argument("--out", default=default_out)

    sp = sub.add_parser("smoke", help="a small load onto the device, compared bit for bit with safetensors")
    sp.add_argument("--device", default="cuda:0")
    sp.add_argument("--mib", type=int, default=64, help="size of the checkpoint (MiB)")
    sp.add_argument("--dir", default=None, help="where to write it (default: the temporary folder)")
    sp.add_argument("--out", default=default_out)

    cp = sub.add_parser("casts", help="torch's casts on the device against its CPU casts")
    cp.add_argument("--device", default="cuda:0")
    cp.add_argument("--samples", type=int, default=1 << 20, help="random F32/F64 bit patterns")
    cp.add_argument("--out", default=default_out)

    args = ap.parse_args(argv)
    args.started = time.perf_counter()
    return {"load": cmd_load, "smoke": cmd_smoke, "casts": cmd_casts}[args.what](args)


if __name__ == "__main__":
    sys.exit(main())
