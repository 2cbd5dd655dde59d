"""Tables and plots of benchmark results."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .units import format_size


def _fmt_row(row: dict[str, Any]) -> list[str]:
    if row.get("status") != "ok":
        return [row["loader"], row["mode"], "n/a", "", "", (row.get("error") or "")[:60]]
    gbps = row.get("gbps")
    gbps = "-" if not gbps else f"{gbps:.2f}" if gbps >= 0.1 else f"{gbps:.2g}"
    ratio = f"{row['ratio']:.3f} ({row['speedup']:.2f}x)" if "ratio" in row else "-"
    return [row["loader"], row["mode"], f"{row['median']:.3f}", gbps, ratio, row.get("backend") or ""]


_HEAD = ["loader", "mode", "median s", "GB/s", "time ratio (speedup)", "backend"]


def format_table(results: dict[str, Any], *, markdown: bool = False, anchor_label: Optional[str] = None) -> str:
    """The rows of a run_benchmark result as an aligned text table (or a markdown table)."""
    head = list(_HEAD)
    if anchor_label:
        head[4] = anchor_label
    body = [_fmt_row(r) for r in results["rows"]]
    return render_table(head, body, markdown=markdown, right={2, 3})


def render_table(head: Sequence[str], body: Sequence[Sequence[Any]], *, markdown: bool = False,
                 right: Optional[set[int]] = None) -> str:
    """A plain aligned table or a GitHub markdown table."""
    body = [[str(c) for c in row] for row in body]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max([len(h)] + [len(r[i]) for r in body if i < len(r)]) for i, h in enumerate(head)]
    right = right or set()

    def fmt(row: Sequence[str]) -> str:
        cells = [(c.rjust(w) if i in right else c.ljust(w)) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])



def plot_results(results: dict[str, Any], out: Union[str, os.PathLike], *, title: Optional[str] = None) -> Path:
    """Write a PNG bar chart of GB/s per loader, grouped by mode (needs matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("median")]
    modes = list(dict.fromkeys(r["mode"] for r in rows)) or ["-"]
    loaders = list(dict.fromkeys(r["loader"] for r in rows))
    by_key = {(r["loader"], r["mode"]): r for r in rows}
    use_gbps = all(r.get("gbps") for r in rows) and bool(rows)

    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(modes) * max(1, len(loaders)) + 1.5), 4.2), dpi=110)
    width = 0.8 / max(1, len(loaders))
    for k, loader in enumerate(loaders):
        xs, ys, labels = [], [], []
        for m, mode in enumerate(modes):
            r = by_key.get((loader, mode))
            if r is None:
                continue
            xs.append(m - 0.4 + width * (k + 0.5))
            ys.append(r["gbps"] if use_gbps else r["median"])
            labels.append(f"{r['median']:.3g} s")
        bars = ax.bar(xs, ys, width=width * 0.95, label=loader)
        for bar, text in zip(bars, labels):
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(modes)))
    ax.set_xticklabels(modes)
    ax.set_ylabel("GB/s (higher is better)" if use_gbps else "median seconds (lower is better)")
    ck = results.get("checkpoint", {})
    cfg = results.get("config", {})
    ax.set_title(title or f"{format_size(ck.get('nbytes', 0))}, {ck.get('tensors', '?')} tensors -> "
                          f"{cfg.get('framework', '?')} (median of {cfg.get('repeat', '?')})", fontsize=10)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    plt.close(fig)
    return out
