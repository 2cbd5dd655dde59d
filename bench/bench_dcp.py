"""torch DCP: fst.dcp.Reader against torch's HuggingFaceStorageReader, same checkpoint and
state dict, at several world sizes (gloo on one machine).

    python bench/bench_dcp.py [--size 1GiB] [--files 4] [--worlds 1,2,3] [--repeat 5] [--cold]
                              [--dtype bfloat16|float32] [--folder DIR]

The checkpoint: BF16 tensors of 4096 columns in --files files. The state dict: a DTensor per
tensor on a 1-D mesh of every rank, cycling through Shard(0) (as FSDP), Shard(1) (as a column
tensor-parallel layer) and Replicate, in --dtype (float32: every byte converted).

Each run starts fresh processes. Per rank it reports: the time of `dcp.load` (rank 0's, from a
barrier before to a barrier after); the extra memory, peak RSS during the load (VmHWM, reset
through /proc/self/clear_refs) minus the RSS with the state dict allocated and touched; and,
around `read_data` alone (the rest of a load also reads sockets), `rchar` (bytes through read
syscalls) and `read_bytes` (bytes fetched from storage) from /proc/self/io, the largest over the
ranks and their sum (ranks on one machine share the page cache). With --cold the
launcher drops the checkpoint's files from the page cache before each run (fsync, then
POSIX_FADV_DONTNEED: no root needed); otherwise they are read once beforehand (warm). Medians
over --repeat runs; the two readers alternate.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READERS = ("fst", "hf")


def make_checkpoint(folder: Path, size: int, files: int) -> None:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cols, rows = 4096, 8192  # 64 MiB per tensor
    count = max(files, size // (rows * cols * 2))
    gen = torch.Generator().manual_seed(0)
    per_file = -(-count // files)
    for f in range(files):
        names = range(f * per_file, min(count, (f + 1) * per_file))
        tensors = {f"layers.{i}.weight": torch.randn(rows, cols, generator=gen).bfloat16() for i in names}
        save_file(tensors, str(folder / f"model-{f + 1:05d}-of-{files:05d}.safetensors"))
    for p in folder.glob("*.safetensors"):
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())


def drop(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        with open(p, "rb") as fh:
            while fh.read(64 << 20):
                pass


def _io() -> dict:
    rows = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(rows[k]) for k in ("rchar", "read_bytes")}


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) << 10
    raise KeyError(field)


def worker(reader_name: str, rank: int, ws: int, port: int, folder: str, dtype: str, out: str) -> None:
    import datetime
    import warnings

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from safetensors import safe_open
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import fst.dcp

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (ws,))
    shapes = {}
    for p in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(p), framework="pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})  # noqa: SIM118 (not a dict)
    placements = [Shard(0), Shard(1), Replicate()]
    state = {}
    for i, (name, shape) in enumerate(sorted(shapes.items())):
        state[name] = distribute_tensor(torch.zeros(shape, dtype=getattr(torch, dtype)), mesh, [placements[i % 3]])
    local_bytes = sum(t.to_local().nbytes for t in state.values())
    cls = fst.dcp.Reader if reader_name == "fst" else HuggingFaceStorageReader

    class Measured(cls):  # type: ignore[valid-type, misc]
        def read_data(self, plan, planner):
            before, t = _io(), time.perf_counter()
            fut = super().read_data(plan, planner)
            fut.wait()
            after = _io()
            self.io = {k: after[k] - before[k] for k in before}
            self.io["read_seconds"] = time.perf_counter() - t
            return fut

    reader = Measured(folder, merge_gap=int(os.environ["BENCH_MERGE_GAP"])) if (
        reader_name == "fst" and "BENCH_MERGE_GAP" in os.environ) else Measured(folder)
    rss0 = _rss("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    dist.barrier()
    t0 = time.perf_counter()
    dcp.load(state, storage_reader=reader)
    dist.barrier()
    seconds = time.perf_counter() - t0
    peak = _rss("VmHWM")
    Path(out, f"{rank}.json").write_text(json.dumps({
        "seconds": seconds, "extra": peak - rss0, "local_bytes": local_bytes, **reader.io}))
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_once(reader: str, ws: int, folder: Path, dtype: str, cold: bool) -> list[dict]:
    if cold:
        drop(folder)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if Path("/sys/class/net/lo").exists():
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", reader, str(r), str(ws), str(port),
                                   str(folder), dtype, out], env=env) for r in range(ws)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"{reader} at world {ws}: a rank failed")
        return [json.loads(Path(out, f"{r}.json").read_text()) for r in range(ws)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--worlds", default="1,2,3")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--folder", help="checkpoint folder (made if missing; default: a temporary one)")
    ap.add_argument("--json", help="write the medians here too")
    ap.add_argument("--merge-gap", type=int, help="fst.dcp.Reader's merge_gap (default: its own)")
    args = ap.parse_args()
    if args.merge_gap is not None:
        os.environ["BENCH_MERGE_GAP"] = str(args.merge_gap)
    size = int(float(args.size.upper().removesuffix("GIB")) * (1 << 30))
    tmp = None if args.folder else tempfile.TemporaryDirectory(dir=".")
    folder = Path(args.folder or tmp.name)  # type: ignore[union-attr]
    if not any(folder.glob("*.safetensors")):
        make_checkpoint(folder, size, args.files)
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    print(f"checkpoint: {total / 2**30:.2f} GiB in {args.files} files; state dict {args.dtype}; "
          f"{'cold' if args.cold else 'warm'} page cache; medians of {args.repeat}")
    if not args.cold:
        warm(folder)
    results = {}
    for ws in [int(w) for w in args.worlds.split(",")]:
        runs: dict[str, list[list[dict]]] = {r: [] for r in READERS}
        for _ in range(args.repeat):
            for r in READERS:
                runs[r].append(run_once(r, ws, folder, args.dtype, args.cold))
        for r in READERS:
            med = {k: statistics.median(run[rank][k] for run in runs[r] for rank in range(ws))
                   for k in ("extra", "rchar", "read_bytes", "read_seconds")}
            med["seconds"] = statistics.median(run[0]["seconds"] for run in runs[r])
            med["max_rank_read_bytes"] = statistics.median(max(x["read_bytes"] for x in run) for run in runs[r])
            med["max_rank_extra"] = statistics.median(max(x["extra"] for x in run) for run in runs[r])
            med["max_rank_rchar"] = statistics.median(max(x["rchar"] for x in run) for run in runs[r])
            # Ranks on one machine share the page cache: a page is fetched by whichever rank
            # asks first, so the sum says more than any one rank's share.
            med["all_ranks_read_bytes"] = statistics.median(sum(x["read_bytes"] for x in run) for run in runs[r])
            results[f"{ws}/{r}"] = med
            print(f"world {ws} {r:3s}: {med['seconds']:7.3f} s  extra RSS {med['max_rank_extra'] / 2**20:7.1f} MiB  "
                  f"rchar/rank {med['max_rank_rchar'] / 2**20:8.1f} MiB  "
                  f"read_bytes/rank {med['max_rank_read_bytes'] / 2**20:8.1f} MiB  "
                  f"all ranks {med['all_ranks_read_bytes'] / 2**20:8.1f} MiB  read_data {med['read_seconds']:.3f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = sys.argv[2:]
        worker(a[0], int(a[1]), int(a[2]), int(a[3]), a[4], a[5], a[6])
    else:
        main()
