"""A federated query's answer (a :class:`flip_magics.queries.QueryResult`, read as an :class:`Answer`) as a
matplotlib figure.

Pure plotting, no IPython: :func:`plot` builds a fresh :class:`matplotlib.figure.Figure` (never
pyplot's global state), so nothing leaks between calls and it renders headless (Agg, papermill).
A withheld value is never drawn as zero: nothing is drawn there, a mark says it was withheld
(an "×" at the baseline, a hatched band, a grey cell) and the caption says what withheld means.
A perturbed count (``noise`` in the answer) has an error bar of its most possible move where it is a
bar, and the caption says by how much the sites move their counts.
A mock answer's figure carries "MOCK" in its title and as a watermark across it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from io import BytesIO
from itertools import product
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from flip_core.query import MISSING_LEVEL, QUANTILE_NAMES, QueryKind

__all__ = ["MAX_SITE_PANELS", "PERTURBED_LABEL", "WITHHELD_CAPTION", "WITHHELD_LABEL", "Answer", "plot", "png"]

Floats = npt.NDArray[np.float64]

WITHHELD_CAPTION = "withheld: value under a site's disclosure threshold (or its complement)"
WITHHELD_LABEL = "withheld"
PERTURBED_LABEL = "_perturbed"  # (a leading underscore keeps it out of the legend)
WITHHELD_COLOUR = "#b0b0b0"
POOLED_COLOUR = "#404040"
MAX_SITE_PANELS = 8  # heat maps by site: small multiples beyond this are unreadable
FIGSIZE = (7.0, 4.0)
WITHHELD_BAND = 0.06  # a withheld histogram bin's band: this fraction of the plot's height, on its baseline
ROTATE_ABOVE = 6  # more level labels than this are rotated
CAPTION_SIZE = 8.0
STATS_PANEL_COLUMNS = 3
HEAT_PANEL_COLUMNS = 4
MAX_ANNOTATED_CELLS = 400  # heat-map cells (all panels together) beyond which numbers are unreadable and slow


class Answer(Protocol):
    """What a figure reads of a query's answer (``flip_magics.queries.QueryResult`` is one): its kind, the per-site
    and pooled frames, the coordinator's answer as it came (``raw``), the sites that did not answer, its title."""

    @property
    def kind(self) -> QueryKind: ...

    @property
    def sites(self) -> pd.DataFrame: ...

    @property
    def pooled(self) -> pd.DataFrame: ...

    @property
    def raw(self) -> Mapping[str, Any]: ...

    @property
    def refused(self) -> Mapping[str, str]: ...

    @property
    def mock(self) -> bool: ...

    def title(self) -> str: ...


@dataclass(frozen=True)
class _Series:
    """One site's (or the pooled) values over the levels, C order; NaN where withheld."""

    name: str
    colour: str
    values: Floats
    noise: Floats | None = None  # the most each value may be off (cell-key perturbation); None: exact


def plot(result: Answer, pooled: bool | None = None) -> Figure:
    """``result`` as a figure: bars, step histograms, heat maps or quantile glyphs, by its kind.

    ``pooled`` draws the pooled table instead of each site's; ``None`` means the kind's default
    (pooled for a crosstab, by site otherwise).
    """
    kind = QueryKind(result.kind)
    dims, levels = _layout(result)
    if pooled is None:
        pooled = kind is QueryKind.CROSSTAB
    if (result.pooled if pooled else result.sites).empty:
        return _finish(_figure(), result, [_nothing_caption(pooled)])
    if kind is QueryKind.STATS:
        fig, captions = _stats(result, pooled)
    elif kind is QueryKind.HIST and len(dims) == 1 and len(levels[0]) == len(_hist_edges(result)) + 2:
        fig, captions = _hist(result, pooled, dims, levels)
    elif kind is QueryKind.CROSSTAB or (kind is QueryKind.COUNT and len(dims) == 2):
        fig, captions = _heat_maps(result, pooled, dims, levels)
    else:
        fig, captions = _bars(result, pooled, kind, dims, levels)
    return _finish(fig, result, captions)


def png(figure: Figure, dpi: float = 100.0) -> bytes:
    """``figure`` as PNG bytes (for ``IPython.display.Image`` where no inline backend shows a Figure)."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# -- reading the result ------------------------------------------------------------------


def _sites(result: Answer) -> list[str]:
    if result.sites.empty or "site" not in result.sites.columns:
        return []
    return list(dict.fromkeys(str(s) for s in result.sites["site"]))


def _colour(index: int) -> str:
    return f"C{index % 10}"


def _layout(result: Answer) -> tuple[list[str], list[list[str]]]:
    """The count table's dims and each dim's levels (the pooled table's, else the first site's)."""
    tables = [result.raw.get("pooled")] + [s.get("table") for s in (result.raw.get("sites") or {}).values()]
    for table in tables:
        if table and "dims" in table:
            return [str(d) for d in table["dims"]], [[str(x) for x in labels] for labels in table["levels"]]
    frame = result.pooled if not result.pooled.empty else result.sites
    dims = [str(c) for c in frame.columns if c not in ("site", "count", "hash", "noise")]
    return dims, [list(dict.fromkeys(str(x) for x in frame[d])) for d in dims]


def _floats(values: Iterable[Any]) -> Floats:
    """Numbers as floats, NaN for ``<NA>``/``None`` (withheld)."""
    return np.array([math.nan if v is None or pd.isna(v) else float(v) for v in values], dtype=np.float64)


def _grid(frame: pd.DataFrame, dims: list[str], levels: list[list[str]], column: str = "count") -> Floats:
    """A count frame's ``column`` as an array over ``levels`` (a level a site does not list counts 0 there, as
    pooled)."""
    grid = np.zeros(tuple(len(labels) for labels in levels), dtype=np.float64)
    where = [{label: i for i, label in enumerate(labels)} for labels in levels]
    keys = zip(*(frame[d].astype(str) for d in dims), strict=True) if dims else [()] * len(frame)
    for key, value in zip(keys, _floats(frame[column]), strict=True):
        grid[tuple(w[k] for w, k in zip(where, key, strict=True))] = value
    return grid


def _one_series(name: str, colour: str, frame: pd.DataFrame, dims: list[str], levels: list[list[str]]) -> _Series:
    noise = _grid(frame, dims, levels, "noise") if "noise" in frame.columns else None
    moved = noise is not None and np.nanmax(noise, initial=0) > 0
    return _Series(name, colour, _grid(frame, dims, levels), noise if moved else None)


def _series(result: Answer, pooled: bool, dims: list[str], levels: list[list[str]]) -> list[_Series]:
    if pooled:
        return [_one_series("pooled", POOLED_COLOUR, result.pooled, dims, levels)]
    sites = result.sites
    return [
        _one_series(name, _colour(i), sites[sites["site"] == name], dims, levels)
        for i, name in enumerate(_sites(result))
    ]


def _withheld(series: Iterable[_Series]) -> list[str]:
    """The caption line on withheld values, where any is."""
    return [WITHHELD_CAPTION] if any(np.isnan(s.values).any() for s in series) else []


def _shown(value: float) -> str:
    return WITHHELD_LABEL if math.isnan(value) else f"{value:,.0f}"


# -- bars: count (0, 1 or 3 dims), cohort, missing -----------------------------------------


def _bars(
    result: Answer, pooled: bool, kind: QueryKind, dims: list[str], levels: list[list[str]]
) -> tuple[Figure, list[str]]:
    fig = _figure()
    ax = fig.add_subplot()
    series = _series(result, pooled, dims, levels)
    ylabel = "rows"
    if kind is QueryKind.MISSING and dims == ["column", "state"]:
        state = levels[1].index("missing") if "missing" in levels[1] else 0
        labels, xlabel, ylabel = levels[0], "column", "rows missing"
        series = [
            _Series(s.name, s.colour, s.values[:, state], None if s.noise is None else s.noise[:, state])
            for s in series
        ]
    elif not dims:
        labels, xlabel = ["cohort" if kind is QueryKind.COHORT else "all rows"], ""
    else:
        labels, xlabel = [" / ".join(combo) for combo in product(*levels)], " / ".join(dims)
    width = 0.8 / len(series)
    for i, one in enumerate(series):
        values = one.values.ravel()
        xs = np.arange(len(labels), dtype=np.float64) + (i - (len(series) - 1) / 2) * width
        shown = ~np.isnan(values)
        ax.bar(xs[shown], values[shown], width=width * 0.95, color=one.colour, label=one.name)
        if one.noise is not None:  # how far each count may be from the truth
            noise = one.noise.ravel()[shown]
            bars = ax.errorbar(xs[shown], values[shown], yerr=noise, fmt="none", ecolor="black", capsize=2)
            bars.set_label(PERTURBED_LABEL)
        if not shown.all():
            _withheld_marks(ax, xs[~shown], one.colour)
    _ticks(ax, labels)
    ax.set_xlim(-0.6, len(labels) - 0.4)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    captions = _withheld(series)
    _legend(ax, withheld=bool(captions))
    return fig, captions


def _withheld_marks(ax: Axes, xs: Floats, colour: str) -> None:
    """An "×" on the baseline where a value was withheld (a bar would read as a count)."""
    ax.plot(xs, np.zeros_like(xs), linestyle="none", marker="x", markersize=8, markeredgewidth=2, color=colour)
    ax.lines[-1].set_gid(WITHHELD_LABEL)
    ax.lines[-1].set_clip_on(False)


def _withheld_handle() -> Line2D:
    return Line2D([], [], linestyle="none", marker="x", markeredgewidth=2, color=POOLED_COLOUR, label=WITHHELD_LABEL)


def _ticks(ax: Axes, labels: Sequence[str], axis: str = "x") -> None:
    positions = np.arange(len(labels))
    size = 7.0 if len(labels) > 20 else None
    if axis == "y":
        ax.set_yticks(positions, list(labels), fontsize=size)
    elif len(labels) > ROTATE_ABOVE:
        ax.set_xticks(positions, list(labels), rotation=45, ha="right", rotation_mode="anchor", fontsize=size)
    else:
        ax.set_xticks(positions, list(labels), fontsize=size)


def _legend(ax: Axes, withheld: bool, extra: Sequence[Any] = (), below: bool = False) -> None:
    """The legend beside the plot, or ``below`` it (long labels there leave the plot its width)."""
    handles, _ = ax.get_legend_handles_labels()
    handles = [*handles, *extra]
    if withheld:
        handles.append(_withheld_handle())
    if handles and below:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False, ncol=2)
    elif handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)


# -- hist -----------------------------------------------------------------------------------


def _hist_edges(result: Answer, site: str | None = None) -> list[float]:
    raw = result.raw
    table = (raw.get("sites") or {}).get(site, {}).get("table") if site else raw.get("pooled")
    edges = (table or {}).get("edges") or (raw.get("pooled") or {}).get("edges") or []
    return [float(e) for e in edges]


def _hist(result: Answer, pooled: bool, dims: list[str], levels: list[list[str]]) -> tuple[Figure, list[str]]:
    """Step histograms over the interior bins; below, above and missing go in the legend."""
    fig = _figure()
    ax = fig.add_subplot()
    labels = levels[0]
    series = _series(result, pooled, dims, levels)
    withheld: list[tuple[float, float, str]] = []  # (from, to, colour) of each withheld bin
    top = 0.0
    for one in series:
        edges = np.array(_hist_edges(result, None if pooled else one.name), dtype=np.float64)
        interior = one.values[1:-2]
        outer = {labels[0]: one.values[0], labels[-2]: one.values[-2], "missing": one.values[-1]}
        label = f"{one.name} ({'; '.join(f'{k}: {_shown(v)}' for k, v in outer.items())})"
        ax.stairs(interior, edges, color=one.colour, linewidth=1.8, label=label)
        withheld += [(edges[i], edges[i + 1], one.colour) for i in np.flatnonzero(np.isnan(interior))]
        top = max(top, float(np.nanmax(interior, initial=0.0)))
    top = top * 1.08 or 1.0
    ax.set_ylim(0, top)
    for start, end, colour in withheld:  # a low hatched band on the baseline: the released bins stay in view
        band = Rectangle((start, 0.0), end - start, WITHHELD_BAND * top, facecolor="none", edgecolor=colour)
        band.set(hatch="///", alpha=0.6, linewidth=0, gid=WITHHELD_LABEL, clip_on=False)
        ax.add_patch(band)
    ax.set_xlabel(dims[0])
    ax.set_ylabel("rows")
    band_handle = Patch(facecolor="none", edgecolor=POOLED_COLOUR, hatch="///", alpha=0.5, label="withheld bin")
    _legend(ax, withheld=False, extra=[band_handle] if withheld else [], below=True)
    captions = [f"{labels[0]}, {labels[-2]} and {MISSING_LEVEL}: counts in the legend (not drawn as bins)"]
    return fig, captions + _withheld(series)


# -- heat maps: crosstab, count by two columns ---------------------------------------------------


def _heat_maps(result: Answer, pooled: bool, dims: list[str], levels: list[list[str]]) -> tuple[Figure, list[str]]:
    panels = _series(result, pooled, dims, levels)
    captions = []
    if len(panels) > MAX_SITE_PANELS:
        captions.append(f"showing {MAX_SITE_PANELS} of {len(panels)} sites (the rest are in .sites)")
        panels = panels[:MAX_SITE_PANELS]
    ncols = min(len(panels), HEAT_PANEL_COLUMNS)
    nrows = math.ceil(len(panels) / ncols)
    fig = _figure((FIGSIZE[0] if ncols < 3 else 10.0, FIGSIZE[1] if nrows == 1 else 3.2 * nrows))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    released = [v for p in panels for v in p.values.ravel() if not math.isnan(v)]
    norm = Normalize(vmin=0.0, vmax=max([1.0, *released]))
    cmap = colormaps["viridis"].with_extremes(bad=WITHHELD_COLOUR)
    size = 8.0 if len(panels) == 1 and panels[0].values.size <= 60 else 6.0
    if sum(p.values.size for p in panels) > MAX_ANNOTATED_CELLS:
        captions.append("too many cells to write their counts (grey cells are withheld): .wide() has the numbers")
        size = 0.0
    image = None
    for ax, panel in zip(axes, panels, strict=False):
        image = _heat_map(ax, panel.values, levels, norm, cmap, size)
        ax.set_title(panel.name, fontsize=10)
        ax.set_xlabel(dims[1])
        ax.set_ylabel(dims[0])
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    if image is not None:
        fig.colorbar(image, ax=axes, label="rows", shrink=0.85)
    return fig, captions + _withheld(panels)


def _heat_map(ax: Axes, grid: Floats, levels: list[list[str]], norm: Normalize, cmap: Colormap, size: float) -> Any:
    """One table as an image, each cell annotated (in ``size`` points; 0: not) with its count or "withheld" (grey)."""
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    _ticks(ax, levels[1])
    _ticks(ax, levels[0], axis="y")
    if not size:
        return image
    for (row, col), value in np.ndenumerate(grid):
        if math.isnan(value):
            colour = "#303030"
        else:
            red, green, blue, _ = cmap(norm(value))
            colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
        ax.text(col, row, _shown(value), ha="center", va="center", fontsize=size, color=colour, in_layout=False)
    return image


# -- stats: quantile glyphs ----------------------------------------------------------------------


def _stats(result: Answer, pooled: bool) -> tuple[Figure, list[str]]:
    frame = result.pooled if pooled else result.sites
    columns = list(dict.fromkeys(str(c) for c in frame["column"]))
    ncols = min(len(columns), STATS_PANEL_COLUMNS)
    nrows = math.ceil(len(columns) / ncols)
    fig = _figure((FIGSIZE[0], FIGSIZE[1] if nrows == 1 else 2.8 * nrows))
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    names = [] if pooled else _sites(result)
    withheld = False
    for ax, column in zip(axes, columns, strict=False):
        withheld |= _stats_panel(ax, result, column, names)
    for ax in axes[len(columns) :]:
        ax.set_axis_off()
    handles: list[Any] = [
        Patch(facecolor=_colour(i), alpha=0.4, edgecolor=_colour(i), label=n) for i, n in enumerate(names)
    ]
    handles.append(Patch(facecolor="white", edgecolor=POOLED_COLOUR, hatch="..", label="pooled"))
    handles.append(Line2D([], [], linestyle="none", marker="D", color=POOLED_COLOUR, label="mean"))
    if withheld:
        handles.append(_withheld_handle())
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    captions = ["box p25–p75, line median, whiskers p5–p95 (no minimum or maximum is released)"]
    if _most_noise(result):
        captions.append("pooled n, mean and std are approximate (the sites' counts are perturbed), and so are the "
                        "pooled quantiles (merged sketches)")  # fmt: skip
    else:
        captions.append("pooled quantiles are approximate (merged sketches); pooled n and mean are exact")
    return fig, captions + ([WITHHELD_CAPTION] if withheld else [])


def _stats_panel(ax: Axes, result: Answer, column: str, names: list[str]) -> bool:
    """One column's glyphs: each named site's, then the pooled one; True where any was withheld."""
    rows = [_stat_row(result.sites, column, site) for site in names]
    rows.append(_stat_row(result.pooled, column, None))
    withheld = False
    labels = []
    for x, (name, row) in enumerate(zip([*names, "pooled"], rows, strict=True)):
        colour = POOLED_COLOUR if name == "pooled" else _colour(x)
        withheld |= _glyph(ax, float(x), row, colour, name)
        labels.append(f"{name}\nn={_shown(_floats([row.get('n')])[0])}")
    if not ax.patches and not any(str(line.get_gid()).startswith("mean:") for line in ax.lines):
        ax.set_yticks([])  # nothing has a value: an empty scale would read as one
    _ticks(ax, labels)
    ax.set_xlim(-0.7, len(labels) - 0.3)
    ax.set_title(column, fontsize=10)
    return withheld


def _stat_row(frame: pd.DataFrame, column: str, site: str | None) -> dict[str, Any]:
    if frame.empty:
        return {}
    picked = frame[frame["column"] == column]
    if site is not None:
        picked = picked[picked["site"] == site]
    return {} if picked.empty else {str(k): v for k, v in picked.iloc[0].items()}


def _glyph(ax: Axes, x: float, row: dict[str, Any], colour: str, name: str) -> bool:
    """Whiskers p5..p95, a box p25..p75, a line at the median, a diamond at the mean.

    True when the quantiles were withheld: only an "×" at the bottom is drawn then.
    """
    p5, p25, p50, p75, p95 = quantiles = _floats(row.get(q) for q in QUANTILE_NAMES)
    mean, n = _floats([row.get("mean"), row.get("n")])
    if not np.isnan(mean):
        ax.plot([x], [mean], marker="D", markersize=4, color=colour, linestyle="none", zorder=4)
        ax.lines[-1].set_gid(f"mean:{name}")
    if np.isnan(quantiles).any():
        if n == 0:  # no values to describe: nothing was withheld
            return False
        mark = ax.plot([x], [0.03], marker="x", markersize=9, markeredgewidth=2, transform=ax.get_xaxis_transform())
        mark[0].set(color=colour, gid=f"{WITHHELD_LABEL}:{name}", clip_on=False)
        return True
    half = 0.3
    (whisker,) = ax.plot([x, x], [p5, p95], color=colour, linewidth=1.2, zorder=1)
    whisker.set_gid(f"whisker:{name}")
    for end in (p5, p95):
        ax.plot([x - half / 2, x + half / 2], [end, end], color=colour, linewidth=1.2)
    box = Rectangle((x - half, p25), 2 * half, p75 - p25, edgecolor=colour, linewidth=1.2, zorder=2)
    box.set(facecolor="white" if name == "pooled" else colour, alpha=1.0 if name == "pooled" else 0.4)
    box.set(hatch=".." if name == "pooled" else None, gid=f"box:{name}")
    ax.add_patch(box)
    (median,) = ax.plot([x - half, x + half], [p50, p50], color=colour, linewidth=2.2, zorder=3)
    median.set_gid(f"median:{name}")
    return False


# -- the figure around it -----------------------------------------------------------------


def _figure(size: tuple[float, float] = FIGSIZE) -> Figure:
    return Figure(figsize=size)


def _most_noise(result: Answer) -> int:
    """The most any site moved its released counts (0: every count is exact)."""
    sites = (result.raw or {}).get("sites", {})
    return max((int((one.get("table") or {}).get("noise") or 0) for one in sites.values()), default=0)


def _has_error_bars(fig: Figure) -> bool:
    return any(c.get_label() == PERTURBED_LABEL for ax in fig.axes for c in ax.containers)


def _nothing_caption(pooled: bool) -> str:
    return "no pooled table: no site released an answer" if pooled else "no site released an answer"


def _finish(fig: Figure, result: Answer, captions: list[str]) -> Figure:
    """The title, the caption lines under the plot, the mock watermark; the layout leaves room for them."""
    fig.suptitle(result.title(), fontsize=11)
    lines = list(captions)
    private = sorted(
        name for name, one in (result.raw or {}).get("sites", {}).items() if (one.get("table") or {}).get("private")
    )
    if private:
        lines.append(
            f"answered under differential privacy (noise without a bound; see the notes): {', '.join(private)}"
        )
    if most := _most_noise(result):
        lines.append(
            f"counts are perturbed: each site's by at most ±{most} (the same rows always give the same count), "
            "pooled ones by at most the sum over the sites in them" + (" (error bars)" if _has_error_bars(fig) else "")
        )
    if result.refused:
        lines.append("not shown (did not answer): " + ", ".join(sorted(result.refused)))
    if not fig.axes:
        fig.text(0.5, 0.5, lines.pop(0), ha="center", va="center", fontsize=11)
    width_chars = int(fig.get_figwidth() * 72 / (0.55 * CAPTION_SIZE))
    wrapped = [part for line in lines for part in textwrap.wrap(line, width_chars)]
    bottom = 0.0
    if wrapped:
        text = fig.text(0.01, 0.01, "\n".join(wrapped), ha="left", va="bottom", fontsize=CAPTION_SIZE)
        text.set(color="#404040", gid="caption")
        bottom = (len(wrapped) * CAPTION_SIZE * 1.25 + 8) / (fig.get_figheight() * 72)
    fig.set_layout_engine("constrained", rect=(0.0, bottom, 1.0, 1.0 - bottom))
    if result.mock:
        mark = fig.text(0.5, 0.5, "MOCK", ha="center", va="center", rotation=30, fontsize=96, fontweight="bold")
        mark.set(color="#d62728", alpha=0.15, zorder=100, gid="mock-watermark")
    return fig
