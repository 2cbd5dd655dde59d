"""The ``fst`` command: inspect, verify, benchmark and diagnose safetensors checkpoints."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from . import benchmark as bm
from ._compare import differing_tensors, reference_bytes, safetensors_loader
from ._inspect import checkpoint_info, verify_checkpoint
from ._settings import BACKENDS, one_of
from .errors import one_line

app = typer.Typer(
    name="fst",
    help="Fast, strict safetensors loading: inspect, verify, benchmark and diagnose checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}

PATH_HELP = "A .safetensors file, a *.safetensors.index.json, or a directory holding them."

# typer.BadParameter is click's, from click itself or from the copy that newer typer releases
# carry: click reports its ClickException base itself (usage errors with exit status 2).
_CLICK_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


# --------------------------------------------------------------------------------------------
# errors: one line, no traceback unless --debug


def _error(text: str) -> None:
    typer.echo(f"error: {text}", err=True)


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn an exception into `error: <message>` on stderr and exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            _error("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _state["debug"] or isinstance(exc, _CLICK_ERROR):
                raise
            _error(one_line(exc))
            raise typer.Exit(1) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        from ._version import __version__

        typer.echo(f"fst {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug


def _dump(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, default=str))


def _size_option(text: str) -> int:
    try:
        return bm.parse_size(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--size") from None


def _choice_option(value: str, choices: tuple[str, ...], option: str) -> None:
    if value not in choices:
        raise typer.BadParameter(f"{value!r}: expected {one_of(choices)}", param_hint=option)


# --------------------------------------------------------------------------------------------
# info


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@app.command()
@_guard
def info(
    path: str = typer.Argument(..., help=PATH_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    limit: Optional[int] = typer.Option(
        None, "--limit", "-n", min=0,
        help="Tensors to list (text: 50 by default; --json: all by default). 0 lists none."),
) -> None:
    """Files, tensor count, sizes, dtypes, alignment, the tensors and the metadata."""
    if limit is None and not as_json:
        limit = 50
    data = checkpoint_info(path, limit)
    if as_json:
        _dump(data)
        return
    multi = len(data["files"]) > 1
    typer.echo(f"path:    {data['path']}")
    typer.echo(f"files:   {len(data['files'])}")
    typer.echo(f"tensors: {data['tensor_count']}")
    typer.echo(f"data:    {bm.format_size(data['nbytes'])} ({data['nbytes']} bytes)")
    typer.echo("")
    typer.echo(bm.render_table(
        ["#", "file", "size", "header", "tensors", "data"],
        [[i, os.path.basename(f["file"]), f["size"], f["header_len"], f["tensors"], bm.format_size(f["nbytes"])]
         for i, f in enumerate(data["files"])],
        right={0, 2, 3, 4, 5}))
    typer.echo("")
    typer.echo(bm.render_table(
        ["dtype", "tensors", "bytes", "share"],
        [[d, v["count"], bm.format_size(v["bytes"]), f"{v['bytes'] / max(1, data['nbytes']):.1%}"]
         for d, v in data["dtypes"].items()],
        right={1, 2, 3}))
    typer.echo("")
    typer.echo("data offset alignment (largest power of two dividing the absolute file offset, at most 4096):")
    typer.echo("  " + "  ".join(f"{k}: {v}" for k, v in data["alignment"].items()))
    if data["tensors"]:
        typer.echo("")
        shown, total = data["tensors_shown"], data["tensor_count"]
        typer.echo(f"tensors ({'all ' + str(total) if shown == total else f'first {shown} of {total}'}, in file order):")
        head = ["name", "dtype", "shape", "bytes", "offset", "align"] + (["file"] if multi else [])
        body = [[t["name"], t["dtype"], _shape(t["shape"]), t["bytes"], t["offset"], t["alignment"]]
                + ([t["file"]] if multi else []) for t in data["tensors"]]
        typer.echo(bm.render_table(head, body, right={3, 4, 5, 6}))
    typer.echo("")
    typer.echo("metadata:")
    for i, f in enumerate(data["files"]):
        label = f"  [{i}] " if multi else "  "
        meta = f["metadata"]
        typer.echo(label + (json.dumps(meta, sort_keys=True) if meta else "(none)"))


# --------------------------------------------------------------------------------------------
# verify


@app.command()
@_guard
def verify(
    path: str = typer.Argument(..., help=PATH_HELP),
    against: Optional[str] = typer.Option(
        None, "--against", help="Also bit-compare every tensor with another reader: 'safetensors'."),
) -> None:
    """Validate every file (each one on its own) and, optionally, compare every tensor.

    Each problem is one line on stderr; exit status 0 when all is good, 1 otherwise."""
    if against not in (None, "safetensors"):
        raise typer.BadParameter(f"unknown reader {against!r}; only 'safetensors' is supported", param_hint="--against")
    report = verify_checkpoint(path, against_safetensors=against is not None)
    for good in report.good:
        typer.echo(f"ok      {good.file}  ({good.tensors} tensors, {bm.format_size(good.nbytes)})")
    for line in report.problems:
        _error(line)
    summary = f"{len(report.files)} file(s), {report.tensors} tensors"
    if against:
        summary += f"; {report.compared} tensors bit-identical to safetensors" if not report.problems else ""
        summary += f"; {report.skipped} not comparable" if report.skipped else ""
    if report.problems:
        typer.echo(f"FAILED: {len(report.problems)} problem(s) in {summary}")
        raise typer.Exit(1)
    typer.echo(f"all good: {summary}")


# --------------------------------------------------------------------------------------------
# bench


def _split_list(values: Optional[List[str]]) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return out


@app.command()
@_guard
def bench(
    path: Optional[str] = typer.Argument(None, help=PATH_HELP + " Without it, a synthetic checkpoint is made."),
    framework: str = typer.Option("torch", "--framework", "-f", help="numpy, torch or jax."),
    size: str = typer.Option("1GiB", "--size", help="Size of the synthetic checkpoint."),
    compare: Optional[List[str]] = typer.Option(
        None, "--compare",
        help="Loaders to compare with (repeatable or comma separated): safetensors, fastsafetensors, "
             "instanttensor, runai, fst-header, safetensors-header; 'none' for fst alone. Default: safetensors."),
    cold: bool = typer.Option(True, "--cold/--no-cold", help="Measure with the page cache dropped."),
    warm: bool = typer.Option(True, "--warm/--no-warm", help="Measure with the files in the page cache."),
    repeat: int = typer.Option(5, "--repeat", "-r", min=1, help="Runs per loader and mode (the median is reported)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG bar chart here."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
    backend: str = typer.Option("auto", "--backend", help="fst backend: auto, pread, direct, mmap (CPU) or gds (GPU)."),
    touch: str = typer.Option("pages", "--touch", help="After loading, read: pages (a byte per 4 KiB), all, none."),
    files: int = typer.Option(3, "--files", min=1, help="Files of the synthetic checkpoint."),
    dtype: str = typer.Option("BF16", "--dtype", help="dtype of the synthetic checkpoint."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."),
) -> None:
    """Time fst against other loaders, each load in a fresh process, warm and cold."""
    _choice_option(backend, BACKENDS, "--backend")
    _choice_option(touch, bm.TOUCH_MODES, "--touch")
    loaders = _split_list(compare) if compare else ["safetensors"]
    nbytes = _size_option(size)
    if plot is not None and not bm.installed("matplotlib"):
        raise RuntimeError("--plot needs matplotlib (pip install matplotlib)")
    log = None if quiet else (lambda msg: typer.echo(msg, err=True))
    results = bm.run_benchmark(path, framework=framework, size=nbytes, repeat=repeat, cold=cold, warm=warm,
                               compare=loaders, backend=backend, touch=touch, files=files, dtype=dtype, log=log)
    if plot is not None:
        results["plot"] = str(bm.plot_results(results, plot))
    if as_json:
        _dump(results)
        return
    ck = results["checkpoint"]
    typer.echo(bm.describe_machine(results["machine"]))
    typer.echo(f"checkpoint: {'synthetic ' if ck['synthetic'] else ''}{len(ck['files'])} file(s), {ck['tensors']} "
               f"tensors, {bm.format_size(ck['nbytes'])} -> {results['config']['framework']}, "
               f"median of {repeat}, touch={touch}")
    typer.echo("")
    typer.echo(bm.format_table(results, anchor_label="vs safetensors: time ratio (speedup)"))
    for row in results["rows"]:
        if row.get("backend"):
            typer.echo(f"fst {row['mode']}: {row['backend']} ({row.get('reason')})")
    for s in results["skipped"]:
        typer.echo(f"skipped {s['loader']}: {s['reason']}")
    for w in results["warnings"]:
        typer.echo(f"warning: {w}")
    if plot is not None:
        typer.echo(f"plot: {results['plot']}")


# --------------------------------------------------------------------------------------------
# demo


@app.command()
@_guard
def demo(
    size: str = typer.Option("256MiB", "--size", help="Size of the synthetic checkpoint."),
    files: int = typer.Option(3, "--files", min=1, help="Number of files."),
    dtype: str = typer.Option("BF16", "--dtype", help="dtype of the tensors."),
) -> None:
    """Make a checkpoint, load it into every installed framework and check every bit against safetensors."""
    import fst

    nbytes = _size_option(size)
    tmp = tempfile.mkdtemp(prefix="fst-demo-")
    try:
        t0 = time.perf_counter()
        ck = bm.make_checkpoint(tmp, nbytes, files=files, dtype=dtype)
        typer.echo(f"made {ck.tensors} tensors ({ck.layers} layers, hidden {ck.hidden}), {bm.format_size(ck.nbytes)} "
                   f"{ck.dtype} in {len(ck.files)} file(s) in {time.perf_counter() - t0:.2f} s")
        file_list = [str(p) for p in ck.files]
        skipped = {fw: why for fw in bm.FRAMEWORKS if (why := bm.framework_problem(fw)) is not None}
        if bm.installed("safetensors"):
            reference, how = reference_bytes(file_list, "torch" not in skipped)
            typer.echo(f"reference: {how}.load_file")
        else:
            reference = None
            typer.echo('reference: none (safetensors is not installed: pip install safetensors); bits not compared')
        rows = []
        failures = 0
        smallest = min(fst.open_checkpoint(ck.path).entries(), key=lambda e: e.end - e.begin).name
        for framework in (fw for fw in bm.FRAMEWORKS if fw not in skipped):
            fst.load(ck.path, framework=framework, keys=[smallest])  # start the framework up, untimed
            # Timed until every page has been read once: zero-copy views cost their page-ins
            # at first touch, which a load that returns lazily must not hide.
            t0 = time.perf_counter()
            tensors = fst.load(ck.path, framework=framework)
            bm.touch_tensors(tensors.values(), framework, "pages")
            seconds = time.perf_counter() - t0
            stats = fst.last_load_stats() or {}
            if reference is None:
                equal = "not compared"
            else:
                bad = differing_tensors(tensors, reference)
                failures += bool(bad)
                equal = "yes" if not bad else f"NO ({len(bad)} tensors differ, e.g. {bad[0]})"
            rows.append([framework, "fst", len(tensors), f"{seconds:.3f}", f"{ck.nbytes / seconds / 1e9:.2f}",
                         stats.get("backend", ""), equal])
            del tensors
            if reference is None:
                continue
            try:
                load_file = safetensors_loader(framework)
                t0 = time.perf_counter()
                theirs: dict[str, Any] = {}
                for f in file_list:
                    theirs.update(load_file(f))
                bm.touch_tensors(theirs.values(), framework, "pages")
                seconds = time.perf_counter() - t0
                rows.append([framework, "safetensors", len(theirs), f"{seconds:.3f}",
                             f"{ck.nbytes / seconds / 1e9:.2f}", "", "(reference)" if framework == "torch" else ""])
                del theirs
            except Exception as exc:
                rows.append([framework, "safetensors", "", "n/a", "", "", one_line(exc)[:50]])
        typer.echo("")
        typer.echo(bm.render_table(["framework", "loader", "tensors", "seconds", "GB/s", "backend", "bit-equal"],
                                   rows, right={2, 3, 4}))
        typer.echo("")
        for framework, why in skipped.items():
            typer.echo(f"not run: {framework}: {why}")
        if failures:
            typer.echo(f"FAILED: {failures} framework(s) differ from safetensors")
            raise typer.Exit(1)
        used = [fw for fw in bm.FRAMEWORKS if fw not in skipped]
        if reference is not None:
            typer.echo(f"every tensor in {', '.join(used)} is bit-identical to safetensors")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# doctor


def _driver_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}" if v else "unknown"


@app.command()
@_guard
def doctor(
    path: Optional[str] = typer.Argument(None, help=PATH_HELP + " Adds what a load of it would do."),
    as_json: bool = typer.Option(False, "--json", help="Print runtime_info() as JSON."),
) -> None:
    """What fst found on this machine, and what a load of PATH would use and why."""
    import fst

    data = fst.runtime_info(path)
    drv = data["cuda_driver"]
    if path is not None:
        data["path"]["filesystem"] = bm.filesystem_of(data["path"]["files"][0])
    if as_json:
        _dump(data)
        return
    say = typer.echo
    say(f"fst {data['version']}: C++ core with {data['threads']} I/O threads by default "
        f"(set FST_THREADS or threads= to change)")
    say(f"CUDA kernels: {'built' if data['cuda_kernels_built'] else 'not built in this install'}")
    if drv.get("available"):
        gpus = drv.get("devices") or []
        say(f"CUDA driver: {_driver_version(drv.get('driver_version', 0))}, {len(gpus)} GPU(s)")
        for i, g in enumerate(gpus):
            say(f"  GPU {i}: {g}")
    else:
        say(f"CUDA driver: not available ({drv.get('reason') or 'no reason given'})")
    cuf = data["cufile"]
    if cuf.get("available"):
        say(f"cuFile (GPUDirect Storage): available ({cuf.get('library')})")
    else:
        say(f"cuFile (GPUDirect Storage): not available ({cuf.get('reason') or 'no reason given'})")
    say(f"GPU loading: {data['gpu_loading']}")
    env = data.get("environment") or {}
    say("environment: " + (", ".join(f"{k}={v}" for k, v in sorted(env.items())) or "no FST_* variables set"))
    p = data.get("path")
    if p:
        fs = p.get("filesystem") or {}
        say("")
        files = p["files"]
        say(f"checkpoint: {path}" + (f" ({len(files)} files; first: {files[0]})" if len(files) > 1 else ""))
        say(f"  filesystem: {fs.get('type', '?')} on {fs.get('device', '?')} (mounted at {fs.get('mount', '?')})")
        say(f"  in the page cache: {p['page_cache_resident']:.0%}")
        od = p["o_direct"]
        say(f"  O_DIRECT on this filesystem: {'supported' if od is True else od}")
        say(f"  a CPU load would use: {p['auto_backend']} ({p['auto_reason']})")


def main() -> None:
    """Console entry point."""
    app(prog_name="fst")


if __name__ == "__main__":
    main()
