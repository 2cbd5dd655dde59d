"""Distributed load on one machine: fst against every rank running safetensors ``load_file``
and slicing.

    python bench/bench_distributed.py [--size 2GiB] [--ranks 4] [--repeat 3] [--cold]

"safetensors+clone" also copies each rank's tensors into its own memory. "fst" is fst's
default: ranks that share one machine and the same files map its page cache (strategy
"local"); ranks that do not (--copies) read each byte once and deliver shards and replicated
tensors by collectives. "fst-collective" forces the collective path (FST_DISTRIBUTED=collective),
the one ranks on different machines take.

The checkpoint (BF16, 4 files) is half tensors sharded on dimension 0 ("*.sharded") and half
replicated tensors ("*.replicated"). Each run starts --ranks fresh processes in a gloo group;
the time is rank 0's, from a barrier before the load to a barrier after every rank has loaded
and read one byte in every 4 KiB page of its tensors. --cold drops the page cache before every
run (needs root), otherwise the file is read once beforehand (warm). Medians over --repeat runs.
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

from fst import benchmark as bm

SHARD = {"*.sharded": 0}


def parse_size(text: str) -> int:
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for u, m in units.items():
        if t.endswith(u):
            return int(float(t[: -len(u)]) * m)
    return int(t)


def make_checkpoint(folder: Path, size: int, files: int = 4) -> int:
    """BF16 tensors of 4096 columns: per layer one sharded and one replicated tensor."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cols = 4096
    per_tensor = min(64 << 20, max(cols * 2, size // 16))
    rows = per_tensor // (cols * 2)
    layers = max(1, size // (2 * rows * cols * 2))
    gen = torch.Generator().manual_seed(0)
    per_file = -(-layers // files)
    total = 0
    for f in range(files):
        tensors = {}
        for layer in range(f * per_file, min(layers, (f + 1) * per_file)):
            for kind in ("sharded", "replicated"):
                t = torch.randint(-32768, 32767, (rows, cols), dtype=torch.int16, generator=gen)
                tensors[f"layers.{layer}.{kind}"] = t.view(torch.bfloat16)
                total += t.numel() * 2
        if tensors:
            save_file(tensors, str(folder / f"model-{f:05d}.safetensors"))
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def touch(tensors) -> int:
    """Read one byte in every 4 KiB page of every tensor."""
    import torch

    acc = 0
    for t in tensors:
        if t.numel():
            acc += int(t.reshape(-1).view(torch.uint8)[::4096].sum())
    return acc


def worker(mode: str, rank: int, ranks: int, port: int, folder: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ranks)
    if Path(folder, f"rank{rank}").is_dir():  # --copies: this rank's own copy of the files
        folder = str(Path(folder, f"rank{rank}"))
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    # Imported before the clock starts, like safetensors: fst and the modules its distributed
    # torch load imports on first use (14 ms of imports per rank, which the clock used to count).
    import fst
    import fst.adapters.torch  # noqa: F401
    import fst.distributed  # noqa: F401
    import safetensors.torch  # noqa: F401

    dist.barrier()
    t0 = time.perf_counter()
    if mode.startswith("fst"):
        got = fst.load(folder, framework="torch", shard=SHARD)
        stats = fst.last_load_stats()
        read = stats["bytes_read"]
    else:
        got = {}
        read = 0
        for f in files:
            for name, t in safetensors.torch.load_file(f).items():
                got[name] = torch.tensor_split(t, ranks, 0)[rank].contiguous() if name.endswith(".sharded") else t
                if mode == "safetensors+clone":
                    got[name] = got[name].clone()
            read += os.path.getsize(f)
        stats = {}
    touch(got.values())
    t_local = time.perf_counter() - t0
    dist.barrier()
    wall = time.perf_counter() - t0
    held = sum(t.numel() * t.element_size() for t in got.values())
    Path(out).write_text(json.dumps({"wall": wall, "local": t_local, "read": read, "held": held, "stats": stats}))
    dist.destroy_process_group()


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_once(mode: str, ranks: int, folder: Path, cold: bool) -> dict:
    if cold:
        drop_caches()
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{r}.json" for r in range(ranks)]
        strategy = "collective" if mode == "fst-collective" else "auto"
        env = dict(os.environ, OMP_NUM_THREADS="1", FST_DISTRIBUTED=strategy)
        if Path("/sys/class/net/lo").exists():
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", mode, str(r), str(ranks), str(port),
                                   str(folder), str(outs[r])], env=env) for r in range(ranks)]
        for p in procs:
            if p.wait(timeout=900) != 0:
                raise SystemExit(f"{mode} worker failed with exit status {p.returncode}")
        res = [json.loads(o.read_text()) for o in outs]
    return {"wall": res[0]["wall"], "read": sum(r["read"] for r in res),
            "held": max(r["held"] for r in res), "stats": [r["stats"] for r in res]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="2GiB")
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    ap.add_argument("--copies", action="store_true",
                    help="give every rank its own copy of the files (as nodes with their own storage: "
                         "ranks then share no page cache)")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    ap.add_argument("--worker", nargs=6, metavar=("MODE", "RANK", "RANKS", "PORT", "DIR", "OUT"))
    args = ap.parse_args()
    if args.worker:
        mode, rank, ranks, port, folder, out = args.worker
        worker(mode, int(rank), int(ranks), int(port), folder, out)
        return

    size = parse_size(args.size)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="fst-bench-dist-"))
    folder = base / "ckpt"
    print(bm.describe_machine(bm.machine_info()) + "\ngloo over loopback TCP", flush=True)
    total = make_checkpoint(folder, size)
    run_dir = folder
    if args.copies:
        import shutil

        run_dir = base / "copies"
        for r in range(args.ranks):
            shutil.copytree(folder, run_dir / f"rank{r}", dirs_exist_ok=True)
    print(f"checkpoint: {total / (1 << 30):.2f} GiB of BF16 in {len(list(folder.glob('*.safetensors')))} files, "
          f"half sharded on dim 0, half replicated; {args.ranks} ranks", flush=True)
    cold = args.cold and drop_caches()
    if args.cold and not cold:
        print("cannot drop the page cache (not root?): runs are warm", flush=True)
    if not cold:
        for f in run_dir.rglob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
    cache = "cold (page cache dropped before every run)" if cold else "warm (checkpoint in the page cache)"
    if args.copies:
        cache += f"; every rank reads its own copy of the files ({args.ranks} copies: no shared page cache)"
    results = {}
    for mode in ("safetensors", "safetensors+clone", "fst", "fst-collective"):
        runs = [run_once(mode, args.ranks, run_dir, cold) for _ in range(args.repeat)]
        results[mode] = runs
        walls = [r["wall"] for r in runs]
        print(f"{mode:<17} wall median {statistics.median(walls):7.3f} s  (runs: "
              + ", ".join(f"{w:.3f}" for w in walls) + f")  bytes read {runs[0]['read'] / total:.2f}x checkpoint"
              f"  per-rank tensors {runs[0]['held'] / (1 << 20):.0f} MiB", flush=True)
    st = statistics.median(r["wall"] for r in results["safetensors"])
    sc = statistics.median(r["wall"] for r in results["safetensors+clone"])
    print(f"page cache: {cache}")
    for mode in ("fst", "fst-collective"):
        fs = statistics.median(r["wall"] for r in results[mode])
        print(f"{mode}: time ratio {fs / st:.3f} to safetensors (speedup {st / fs:.2f}x), {fs / sc:.3f} to "
              f"safetensors+clone; bytes read {results[mode][0]['read'] / total:.2f}x the checkpoint, "
              f"safetensors {results['safetensors'][0]['read'] / total:.2f}x")
        for s in results[mode][-1]["stats"]:
            print(f"  rank {s['rank']} [{s['strategy']}, {s['backend']}]: read {s['bytes_read'] / (1 << 20):.0f} MiB, "
                  f"sent {s['bytes_sent'] / (1 << 20):.0f} MiB, received {s['bytes_received'] / (1 << 20):.0f} MiB, "
                  f"staging peak {s['staging_peak'] / (1 << 20):.0f} MiB; plan {s['seconds_plan']:.3f} s, "
                  f"read {s['seconds_read']:.3f} s, copy {s['seconds_copy']:.3f} s, comm {s['seconds_comm']:.3f} s, "
                  f"total {s['seconds']:.3f} s")
    if not args.dir:
        import shutil

        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
