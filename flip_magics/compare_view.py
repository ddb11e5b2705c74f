"""Two runs side by side for ``%flip_compare``: a table of every metric and a figure with one panel per metric,
each run's global curve (solid: the first run, dashed: the second) and its sites' curves thin beneath them.

Pure plotting over :class:`flip_core.records.Comparison` (a fresh matplotlib Figure, never pyplot's state), so
it renders headless."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from flip_core.records import Comparison

COLUMNS = ["round", "site", "phase", "metric", "a", "b", "difference", "equal"]
PANEL_PHASES = ("evaluate", "train")


def comparison_frame(comparison: Comparison) -> pd.DataFrame:
    """Every metric of either run: its value in each (None where one lacks it), the difference, equal to the bit."""
    frame = pd.DataFrame(comparison.rows, columns=COLUMNS)
    return frame.rename(columns={"a": comparison.run_a, "b": comparison.run_b})


def comparison_figure(comparison: Comparison) -> Figure:
    rows = [r for r in comparison.rows if r["phase"] in PANEL_PHASES]
    metrics = sorted({(r["phase"], r["metric"]) for r in rows})
    columns = min(len(metrics), 2) or 1
    lines = (len(metrics) + columns - 1) // columns or 1
    fig = Figure(figsize=(5.2 * columns, 3.0 * lines + 0.6))
    verdict = "identical" if comparison.identical else f"{len(comparison.differing)} metrics differ"
    fig.suptitle(f"run {comparison.run_a} (solid) vs {comparison.run_b} (dashed): {verdict}", fontsize=10)
    for index, (phase, metric) in enumerate(metrics):
        ax = fig.add_subplot(lines, columns, index + 1)
        chosen = [r for r in rows if (r["phase"], r["metric"]) == (phase, metric)]
        for series in sorted({r["site"] for r in chosen}, key=lambda s: (s != "global", s)):
            points = sorted((r["round"], r["a"], r["b"]) for r in chosen if r["site"] == series)
            width, alpha = (2.2, 1.0) if series == "global" else (0.9, 0.55)
            for k, style in ((1, "-"), (2, "--")):
                xs = [p[0] for p in points if p[k] is not None]
                ys = [p[k] for p in points if p[k] is not None]
                label = series if k == 1 else None
                ax.plot(xs, ys, style, linewidth=width, alpha=alpha, label=label, color=_colour(series, chosen))
        ax.set_title(f"{phase} {metric}", fontsize=9)
        ax.set_xlabel("round", fontsize=8)
        ax.tick_params(labelsize=7)
        if index == 0:
            ax.legend(fontsize=7)
    if not metrics:
        fig.text(0.5, 0.5, "neither run released metrics", ha="center")
    if comparison.changes:
        fig.text(0.01, 0.005, "changed: " + "; ".join(comparison.changes)[:300], fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05 if comparison.changes else 0, 1, 0.95))
    return fig


def _colour(series: str, rows: list[dict[str, object]]) -> str:
    if series == "global":
        return "#24292f"
    sites = sorted({str(r["site"]) for r in rows} - {"global"})
    return f"C{sites.index(series) % 10}"


__all__ = ["comparison_figure", "comparison_frame"]
