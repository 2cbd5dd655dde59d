"""fst.torch.load_into against model.load_state_dict(safetensors.torch.load_file(...)).

    python bench/bench_load_into.py [--size 2GiB] [--repeat 5] [--budget BYTES] [--out FILE.json]

A model of --size in BF16 (square 4096-wide weights), built and touched (every parameter
written once) before the load, receives a checkpoint of the same names:

- same:    a BF16 checkpoint into the BF16 model;
- convert: the same checkpoint into the model in float32 (twice --size).

The page cache is warm, so fst copies or converts out of mappings of the file, a span at a
time (its other routes serve files not in the page cache and CUDA destinations).

Every load runs in a fresh process, after the page cache was warmed with the checkpoint. The
child reports the load's wall time and its extra peak memory: VmHWM minus VmRSS just before
the load, both from /proc/self/status (exact, unlike statm's figures). Each loader's modules
are imported before the clock starts. Medians over --repeat
runs, fst and the anchor alternating. Each run's checksum of the loaded parameters must
match between the two.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

WIDTH = 4096

CHILD = textwrap.dedent("""
    import json, sys, time
    import torch

    loader, path, dtype, count, budget = sys.argv[1:6]
    dtype, count = getattr(torch, dtype), int(count)
    budget = None if budget == "default" else int(budget)

    def kib(field):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(WIDTH, WIDTH, bias=False, dtype=dtype, device="meta")
                                              for _ in range(count))

    model = Model().to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)  # touched: every page resident, as in a model that has been used
    if loader == "fst":
        import fst._load_into, fst.torch  # imported before the clock starts, as the anchor's
        load = lambda: fst.torch.load_into(model, path, budget=budget)
    else:
        import safetensors.torch
        load = lambda: model.load_state_dict(safetensors.torch.load_file(path))
    before = kib("VmRSS")
    start = time.perf_counter()
    load()
    seconds = time.perf_counter() - start
    extra = kib("VmHWM") - before
    check = sum(float(p.float().sum()) for p in model.parameters())
    print(json.dumps({"seconds": seconds, "extra_peak_mib": extra / 1024, "checksum": check}))
""").replace("WIDTH", str(WIDTH))


def parse_size(text: str) -> int:
    units = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}
    for unit, factor in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def make_checkpoint(path: Path, count: int) -> None:
    import torch
    import safetensors.torch

    g = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=g).bfloat16() for i in range(count)}
    safetensors.torch.save_file(tensors, str(path))


def run_child(loader: str, path: Path, dtype: str, count: int, budget: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, loader, str(path), dtype, str(count), budget],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GiB", help="checkpoint size (BF16), at least 1 GiB for the issue's target")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", default="default",
                    help="fst's budget in bytes (default: $FST_STAGING_BUDGET or 256 MiB)")
    ap.add_argument("--cases", default="same,convert")
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: the temp dir)")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    args = ap.parse_args(argv)

    count = max(1, parse_size(args.size) // (WIDTH * WIDTH * 2))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "model.safetensors"
        make_checkpoint(path, count)
        size = path.stat().st_size
        print(f"checkpoint: {count} BF16 tensors of {WIDTH}x{WIDTH}, {size / (1 << 30):.2f} GiB; "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", file=sys.stderr)
        results = {"size_bytes": size, "tensors": count, "repeat": args.repeat, "budget": args.budget, "cases": {}}
        for case in args.cases.split(","):
            dtype = {"same": "bfloat16", "convert": "float32"}[case]
            runs: dict[str, list[dict]] = {"fst": [], "anchor": []}
            for _ in range(args.repeat):
                for loader in runs:
                    warm(path)
                    runs[loader].append(run_child(loader, path, dtype, count, args.budget))
            checks = {r["checksum"] for rs in runs.values() for r in rs}
            if len(checks) != 1:
                raise SystemExit(f"{case}: the loads disagree (checksums {sorted(checks)})")
            summary = {loader: {"seconds": statistics.median(r["seconds"] for r in rs),
                                "extra_peak_mib": statistics.median(r["extra_peak_mib"] for r in rs),
                                "runs": rs} for loader, rs in runs.items()}
            results["cases"][case] = summary
            f, a = summary["fst"], summary["anchor"]
            print(f"{case:8} model {dtype:9} fst {f['seconds']:.3f} s, +{f['extra_peak_mib']:.0f} MiB   "
                  f"anchor {a['seconds']:.3f} s, +{a['extra_peak_mib']:.0f} MiB   "
                  f"speedup {a['seconds'] / f['seconds']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
