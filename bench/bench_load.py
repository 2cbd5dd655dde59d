"""Load-time targets of fst on this machine, against safetensors.

    python bench/bench_load.py [--size 2GiB] [--repeat 5] [--many-tensors] [--out bench/out]

(a) one BF16 file of --size into torch on the CPU, warm and cold: fst.load vs
    safetensors.torch.load_file (plus fastsafetensors / instanttensor / runai when installed);
(b) the same file into JAX CPU arrays, warm: fst.load vs safetensors.flax.load_file;
(c) with --many-tensors: one file of 250,000 tiny tensors into numpy: fst.load vs
    safetensors.numpy.load_file, and the header parse alone (fst.open_checkpoint vs
    safetensors.safe_open(...).keys());
(d) with --many-tensors: the same file into torch, warm: fst.load vs safetensors.torch.load_file.

Every load runs in a fresh process; the time is the child's own, from just before the load
call to after one byte in every 4 KiB page of every tensor has been read ((c) reads nothing
after loading: its data is 4 MB, and touching 250,000 tensors would cost more than loading
them; the same for (d)). Cold runs drop the page cache before each load. Medians over --repeat runs.
Results go to <out>/results.json and <out>/results.md (and a PNG per case with matplotlib).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fst import benchmark as bm

EXTRA_TORCH_LOADERS = ("fastsafetensors", "instanttensor", "runai")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def headline(case: dict) -> list[str]:
    """One line per mode: fst against its anchor."""
    lines = []
    rows = case["results"]["rows"]
    for row in rows:
        if row["loader"] not in ("fst", "fst-header") or row.get("status") != "ok":
            continue
        anchor = next((r for r in rows if r["loader"] == row.get("anchor") and r["mode"] == row["mode"]), None)
        if anchor is None:
            lines.append(f"{case['id']} {row['mode']}: {row['loader']} {row['median']:.3f} s (no {bm.DEFAULT_ANCHOR} result)")
            continue
        lines.append(
            f"{case['id']} {row['mode']:<4} {row['loader']:<10} {row['median']:8.3f} s  vs  {anchor['loader']:<18} "
            f"{anchor['median']:8.3f} s   time ratio {row['ratio']:.3f}   speedup {row['speedup']:.2f}x"
            + (f"   [{row['backend']}]" if row.get("backend") else ""))
    return lines


def section_text(case: dict, markdown: bool = False) -> str:
    res = case["results"]
    ck = res["checkpoint"]
    cfg = res["config"]
    title = f"({case['id']}) {case['title']}"
    detail = (f"{len(ck['files'])} file, {ck['tensors']} tensors, {bm.format_size(ck['nbytes'])} -> "
              f"{cfg['framework']}; modes: {', '.join(cfg['modes'])}; median of {cfg['repeat']}; touch={cfg['touch']}")
    out = [f"### {title}" if markdown else title, "", detail, ""]
    out.append(bm.format_table(res, markdown=markdown, anchor_label="time ratio (speedup) vs anchor"))
    out.append("")
    for row in res["rows"]:
        if row.get("backend"):
            out.append(f"- fst {row['mode']}: {row['backend']}: {row.get('reason')}" if markdown
                       else f"fst {row['mode']}: {row['backend']}: {row.get('reason')}")
        if row.get("status") == "ok" and row.get("times"):
            times = ", ".join(f"{t:.3f}" for t in row["times"])
            out.append(f"{'- ' if markdown else ''}{row['loader']} {row['mode']} runs (s): {times}")
        elif row.get("status") != "ok":
            out.append(f"{'- ' if markdown else ''}{row['loader']} {row['mode']}: n/a: {row.get('error')}")
    for s in res["skipped"]:
        out.append(f"{'- ' if markdown else ''}skipped {s['loader']}: {s['reason']}")
    for w in res["warnings"]:
        out.append(f"{'- ' if markdown else ''}warning: {w}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GiB", help="size of the one-file BF16 checkpoint of (a) and (b)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per loader and mode; medians are reported")
    ap.add_argument("--many-tensors", action="store_true", help="also run (c), 250,000 tiny tensors")
    ap.add_argument("--tensors", type=int, default=250_000, help="tensors of (c)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="output directory")
    ap.add_argument("--dir", default=None, help="where to write the checkpoints (default: the temp dir)")
    ap.add_argument("--skip-jax", action="store_true", help="leave out (b)")
    args = ap.parse_args(argv)

    size = bm.parse_size(args.size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fst-bench-load-", dir=args.dir))
    machine = bm.machine_info(work)
    started = time.time()
    cases: list[dict] = []
    try:
        log(f"writing a {bm.format_size(size)} BF16 checkpoint (one file) in {work}")
        t0 = time.perf_counter()
        ck = bm.make_checkpoint(work / "one", size, files=1, dtype="BF16")
        log(f"  written in {time.perf_counter() - t0:.1f} s")

        extra = [name for name in EXTRA_TORCH_LOADERS if bm.loader_status(name, "torch") is None]
        log("(a) torch, warm and cold")
        res = bm.run_benchmark(ck.path, framework="torch", repeat=args.repeat, cold=True, warm=True,
                               compare=("safetensors", *extra), log=log)
        cases.append({"id": "a", "title": f"{bm.format_size(size)} BF16, one file -> torch CPU: fst.load vs "
                                          "safetensors.torch.load_file", "results": res})

        if not args.skip_jax:
            if bm.loader_status("fst", "jax") is None:
                log("(b) jax, warm")
                res = bm.run_benchmark(ck.path, framework="jax", repeat=args.repeat, cold=False, warm=True,
                                       compare=("safetensors",), log=log)
                cases.append({"id": "b", "title": f"{bm.format_size(size)} BF16, one file -> JAX CPU arrays: "
                                                  "fst.load vs safetensors.flax.load_file", "results": res})
            else:
                log("(b) skipped: jax is not installed")
        shutil.rmtree(work / "one", ignore_errors=True)

        if args.many_tensors:
            log(f"writing {args.tensors:,} tiny tensors")
            t0 = time.perf_counter()
            many = bm.make_many_tensors(work / "many" / "many.safetensors", args.tensors)
            log(f"  written in {time.perf_counter() - t0:.1f} s ({bm.format_size(many.stat().st_size)})")
            log("(c) many tensors -> numpy, warm and cold")
            res = bm.run_benchmark(many, framework="numpy", repeat=args.repeat, cold=True, warm=True, touch="none",
                                   compare=("safetensors", "fst-header", "safetensors-header"), log=log)
            import fst

            res["checkpoint"]["header_bytes"] = fst.open_checkpoint(many).header_len(0)
            cases.append({"id": "c", "title": f"{args.tensors:,} tiny F32 tensors, one file "
                                              f"({bm.format_size(res['checkpoint']['header_bytes'])} header) -> numpy: "
                                              "fst.load vs safetensors.numpy.load_file; header parse alone: "
                                              "fst.open_checkpoint vs safetensors.safe_open().keys()",
                          "results": res})
            log("(d) many tensors -> torch, warm")
            res = bm.run_benchmark(many, framework="torch", repeat=args.repeat, cold=False, warm=True, touch="none",
                                   compare=("safetensors",), log=log)
            cases.append({"id": "d", "title": f"{args.tensors:,} tiny F32 tensors, one file -> torch CPU: "
                                              "fst.load vs safetensors.torch.load_file", "results": res})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = ["fst load benchmark", "", bm.describe_machine(machine), ""]
    md = ["# fst load benchmark", "", "```", bm.describe_machine(machine), "```", ""]
    for case in cases:
        lines += [section_text(case), ""]
        md += [section_text(case, markdown=True), ""]
    heads = [h for case in cases for h in headline(case)]
    lines += ["summary (medians; time ratio = fst time / anchor time):"] + ["  " + h for h in heads]
    md += ["### Summary", "", "```"] + heads + ["```", ""]
    lines.append("")
    lines.append(f"total wall time: {time.time() - started:.0f} s")
    text = "\n".join(lines)
    print(text)

    (out / "results.json").write_text(json.dumps({"machine": machine, "cases": cases}, indent=2, default=str) + "\n")
    (out / "results.md").write_text("\n".join(md))
    written = [out / "results.json", out / "results.md"]
    if bm.installed("matplotlib"):
        for case in cases:
            written.append(bm.plot_results(case["results"], out / f"case_{case['id']}.png",
                                           title=f"({case['id']}) {case['title'][:90]}"))
    print("wrote: " + ", ".join(os.path.relpath(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
