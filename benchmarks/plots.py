"""PNG plots of the e2e rows: grouped bars (tokens/s, peak memory) and the loss against hf's.

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so that plotting
selects no backend and leaves no global state; ``plot_results`` saves them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchmarks.configs import CONFIGS, SYSTEMS
from benchmarks.report import GIB, ordered, safe_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REFERENCE = "hf"


def short_reason(row: dict[str, Any] | None) -> str:
    """Why a row has no result, cut to its kind: ``out of memory``, ``not installed``, ``timed out
    after 240 s``, ``time budget spent``, ``RuntimeError``...; ``no result`` when there is no row."""
    if row is None:
        return "no result"
    reason = str(row.get("reason") or "unknown").removeprefix("not run: ")
    return re.split(r": | \(", reason, maxsplit=1)[0][:40]


def gap_label(system: str, row: dict[str, Any] | None) -> str:
    """The text of a cell without a value: ``<system> not run: <short reason>`` for a failed or
    missing row, ``<system>: not measured`` for an ok row without the figure (peak memory on CPU)."""
    if row is not None and row.get("status") == "ok":
        return f"{system}: not measured"
    return f"{system} not run: {short_reason(row)}"


def bar_figure(rows: list[dict[str, Any]], value: Callable[[dict[str, Any]], float | None], title: str, fmt: str) -> Figure:
    """Grouped bars, configuration x system, each labelled with ``fmt``. A cell without a value is
    a hatched slot in its system's colour with ``gap_label`` written up it, never a zero bar."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    systems = ordered((r["system"] for r in rows), SYSTEMS)
    configs = ordered((r["config"] for r in rows), list(CONFIGS))
    by = {(r["config"], r["system"]): r for r in rows}
    fig = Figure(figsize=(max(6, 1.6 * len(configs) * max(1, len(systems)) / 3), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(systems))
    for j, s in enumerate(systems):
        color, xs, ys = f"C{j}", [], []
        for i, c in enumerate(configs):
            r = by.get((c, s))
            x = i + (j - (len(systems) - 1) / 2) * width
            v = value(r) if r and r.get("status") == "ok" else None
            if v:
                xs.append(x)
                ys.append(v)
                continue
            ax.axvspan(x - width / 2, x + width / 2, facecolor="none", edgecolor=color, hatch="//", alpha=0.4, lw=0)
            # axis coordinates in y: the label stays inside the slot whatever the bars' scale
            ax.text(x, 0.02, gap_label(s, r), transform=ax.get_xaxis_transform(), rotation=90,
                    ha="center", va="bottom", fontsize=6)
        ax.bar_label(ax.bar(xs, ys, width, label=s, color=color), fmt=fmt, fontsize=6)
    ax.set_xticks(range(len(configs)), configs)
    ax.set_title(title)
    # explicit handles: a system without a single bar still gets its colour in the legend
    ax.legend(handles=[Patch(color=f"C{j}", label=s) for j, s in enumerate(systems)], fontsize=7)
    fig.tight_layout()
    return fig


def loss_vs_reference(rows: list[dict[str, Any]], reference: str = REFERENCE) -> dict[str, list[float]] | None:
    """For the rows of one configuration: per system with losses, ``(loss - ref) / |ref|`` at each
    step both runs have (``ref`` the reference's loss; a zero ``ref`` divides by 1, as in
    ``stats.max_relative_difference``; NaN where either loss is not finite), the reference's own
    series all zeros. ``None`` when the reference has no ok row with losses."""
    ref = next((r["losses"] for r in rows if r["system"] == reference and r.get("status") == "ok" and r.get("losses")), None)
    if ref is None:
        return None
    rel = lambda l, r: (l - r) / (abs(r) or 1.0) if math.isfinite(l) and math.isfinite(r) else math.nan
    return {r["system"]: [rel(l, b) for l, b in zip(r["losses"], ref)] for r in rows if r.get("losses")}


def loss_figure(rows: list[dict[str, Any]], config: str, reference: str = REFERENCE) -> Figure:
    """The losses at ``config`` per step as ``loss_vs_reference`` gives them (the reference is the
    zero line), in percent; when the reference has no losses, the plain loss curves and a title
    that says so and why. Systems without losses are in the legend with ``gap_label``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    systems = ordered((r["system"] for r in rows), SYSTEMS)
    by = {r["system"]: r for r in rows if r["config"] == config}
    diffs = loss_vs_reference(list(by.values()), reference)
    series = diffs if diffs is not None else {s: r["losses"] for s, r in by.items() if r.get("losses")}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for j, s in enumerate(systems):  # colours as in bar_figure
        if s in series:
            ax.plot(range(len(series[s])), series[s], marker="o", ms=3, label=s, color=f"C{j}")
        else:  # an entry without a line: the legend says who is missing and why
            ax.plot([], [], " ", label=gap_label(s, by.get(s)))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if diffs is not None:
        ax.set_title(f"{config}: loss relative to {reference}'s at the same step")
        ax.set_ylabel(f"(loss - {reference}) / {reference}")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    else:
        ax.set_title(f"{config}: loss per step ({gap_label(reference, by.get(reference))}; no reference)")
        ax.set_ylabel("loss")
    if not series:
        ax.text(0.5, 0.5, "no system produced a loss", ha="center", transform=ax.transAxes)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_results(rows: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """tokens_per_s.png and peak_memory.png (``bar_figure``) and loss_<config>.png
    (``loss_figure``) in ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "tokens_per_s.png": bar_figure(rows, lambda r: r.get("tokens_per_s"), "tokens / s (higher is better)", "%.0f"),
        "peak_memory.png": bar_figure(rows, lambda r: (r.get("peak_bytes") or 0) / GIB or None,
                                      "peak allocated GiB (lower is better)", "%.1f"),
    }
    for c in ordered((r["config"] for r in rows), list(CONFIGS)):
        figures[f"loss_{safe_name(c)}.png"] = loss_figure(rows, c)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120)
        paths.append(out_dir / name)
    return paths
