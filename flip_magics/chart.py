"""Pure HTML/SVG renderers for the FLIP run widget.

Everything here returns plain strings: a self-contained SVG of per-round
metrics (a panel per metric, each site's curve beside the global one), an
HTML table of the final metrics, one of site states and a one-line run header.
No IPython or ipywidgets imports, no JavaScript, no external CSS; all user
supplied text is escaped with :func:`html.escape`.  Output is deterministic
for identical input.

Chart structure: ``<g class="legend">``, then per metric a
``<g class="panel" data-metric=...>`` holding a ``text.panel-title``,
``g.axes``, ``g.yticks``, ``g.xticks`` and per series a
``<g class="series" data-series=... data-metric=...>`` with one polyline
(same data attributes) and a circle per point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

__all__ = [
    "render_chart",
    "render_summary",
    "render_site_table",
    "render_header",
    "Point",
    "PALETTE",
    "EMPTY_CHART_TEXT",
    "GLOBAL",
]

PALETTE: tuple[str, ...] = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
EMPTY_CHART_TEXT = "waiting for the first round…"
GLOBAL = "global"  # the series name of the aggregated (server-side) metrics
GLOBAL_COLOUR = "#24292f"

_STATUS_COLOURS: dict[str, str] = {
    "waiting": "#6e7781",
    "preparing": "#6e7781",
    "waiting-approval": "#9a6700",
    "ready": "#1a7f37",
    "training": "#1f6feb",
    "evaluating": "#1f6feb",
    "done": "#1a7f37",
    "late": "#9a6700",
    "rejoined": "#1a7f37",
    "failed": "#cf222e",
    "offline": "#9a6700",
}
_RUN_STATUS_COLOURS: dict[str, str] = {
    "running": "#1f6feb",
    "completed": "#1a7f37",
    "failed": "#cf222e",
    "stopped": "#6e7781",
}
_FONT = 'font-family="sans-serif" font-size="11"'


def _fmt(v: float) -> str:
    """Format an SVG coordinate compactly and deterministically."""
    s = f"{v:.1f}"
    return "0.0" if s == "-0.0" else s


def _nice_ticks(lo: float, hi: float) -> list[float]:
    """Return 3-5 evenly spaced, nicely rounded ticks covering [lo, hi]."""
    if hi <= lo:
        pad = abs(lo) * 0.1 if lo != 0 else 1.0
        lo, hi = lo - pad, hi + pad
    mag = 10.0 ** (math.floor(math.log10((hi - lo) / 4.0)) - 1)
    while True:
        for mult in (1.0, 2.0, 2.5, 5.0):
            step = mult * mag
            first = math.floor(lo / step + 1e-9)
            last = math.ceil(hi / step - 1e-9)
            if last - first <= 4:
                if last - first < 2:  # guarantee at least three ticks
                    last = first + 2
                return [k * step for k in range(first, last + 1)]
        mag *= 10.0


def _tick_label(v: float, step: float) -> str:
    """Format a tick value with just enough decimals for ``step``."""
    for dec in range(0, 13):
        if abs(round(step, dec) - step) <= 1e-9 * abs(step):
            s = f"{v:.{dec}f}"
            return "0" if s.lstrip("-").strip("0.") == "" else s
    return f"{v:.6g}"


def _int_ticks(lo: int, hi: int) -> list[int]:
    """Integer ticks from lo to hi with at most ~10 labels."""
    span = max(hi - lo, 1)
    step = 1
    for cand in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        step = cand
        if span / cand <= 10:
            break
    else:
        step = int(10 ** math.ceil(math.log10(span / 10)))
    first = -(-lo // step) * step
    return list(range(first, hi + 1, step))


def _svg_open(width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" {_FONT}>'
    )


@dataclass(frozen=True)
class _Plot:
    """Where the plot area lies in the SVG and what data range it shows."""

    left: float
    top: float
    width: float
    height: float
    x_lo: float
    x_hi: float
    y_lo: float
    y_hi: float

    def sx(self, x: float) -> float:
        return self.left + (x - self.x_lo) / (self.x_hi - self.x_lo) * self.width

    def sy(self, y: float) -> float:
        return self.top + self.height - (y - self.y_lo) / (self.y_hi - self.y_lo) * self.height

    @property
    def axis_y(self) -> float:
        return self.top + self.height


def _axes(plot: _Plot) -> str:
    left, top, axis_y = plot.left, plot.top, plot.axis_y
    return (
        '<g class="axes" stroke="#8c959f" stroke-width="1">'
        f'<line x1="{_fmt(left)}" y1="{_fmt(axis_y)}" x2="{_fmt(left + plot.width)}" y2="{_fmt(axis_y)}"/>'
        f'<line x1="{_fmt(left)}" y1="{_fmt(top)}" x2="{_fmt(left)}" y2="{_fmt(axis_y)}"/>'
        "</g>"
    )


def _y_ticks(plot: _Plot, ticks: list[float], step: float) -> str:
    parts = ['<g class="yticks">']
    for t in ticks:
        ty = plot.sy(t)
        parts.append(
            f'<line x1="{_fmt(plot.left)}" y1="{_fmt(ty)}" x2="{_fmt(plot.left + plot.width)}" y2="{_fmt(ty)}" '
            f'stroke="#eaeef2" stroke-width="1"/>'
            f'<text x="{_fmt(plot.left - 4)}" y="{_fmt(ty + 4)}" text-anchor="end">{_tick_label(t, step)}</text>'
        )
    parts.append("</g>")
    return "".join(parts)


Point = tuple[str, str, float, float]  # (metric, series, round, value); series is "global" or a site
_Series = dict[str, list[tuple[float, float]]]


def _metric_key(metric: str) -> tuple[int, str]:
    """Evaluate metrics first, then fit/train ones, then the rest; alphabetical within each."""
    phase = metric.split(" ", 1)[0]
    return ({"evaluate": 0, "fit": 1, "train": 1}.get(phase, 2), metric)


def _series_key(name: str) -> tuple[bool, str]:
    return (name != GLOBAL, name)


def _by_metric(points: list[Point]) -> dict[str, _Series]:
    """Finite points per metric and series, metrics in panel order."""
    out: dict[str, _Series] = {}
    for metric, series, x, y in points:
        xf, yf = float(x), float(y)
        if math.isfinite(xf) and math.isfinite(yf):
            out.setdefault(str(metric), {}).setdefault(str(series), []).append((xf, yf))
    return {m: out[m] for m in sorted(out, key=_metric_key)}


def _colours(metrics: dict[str, _Series]) -> dict[str, str]:
    """Global is dark; each site gets a palette colour by its place among all sites."""
    names = {s for series in metrics.values() for s in series}
    colours = {GLOBAL: GLOBAL_COLOUR} if GLOBAL in names else {}
    return colours | {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(names - {GLOBAL}))}


def _x_ticks(plot: _Plot) -> str:
    parts, axis_y = ['<g class="xticks">'], plot.axis_y
    for t in _int_ticks(int(plot.x_lo), int(plot.x_hi)):
        tx = plot.sx(t)
        parts.append(
            f'<line x1="{_fmt(tx)}" y1="{_fmt(axis_y)}" x2="{_fmt(tx)}" y2="{_fmt(axis_y + 4)}" stroke="#8c959f"/>'
            f'<text x="{_fmt(tx)}" y="{_fmt(axis_y + 15)}" text-anchor="middle">{t}</text>'
        )
    parts.append(
        f'<text x="{_fmt(plot.left + plot.width / 2)}" y="{_fmt(axis_y + 28)}" text-anchor="middle">round</text></g>'
    )
    return "".join(parts)


def _curves(plot: _Plot, metric: str, series: _Series, colours: dict[str, str]) -> str:
    """One group per series: a polyline and a dot per point; sites first so global is drawn on top."""
    parts = []
    for name in sorted(series, key=lambda s: (s == GLOBAL, s)):
        pts = sorted(series[name])
        stroke, radius = ("2.5", "2.6") if name == GLOBAL else ("1.3", "1.8")
        coords = " ".join(f"{_fmt(plot.sx(x))},{_fmt(plot.sy(y))}" for x, y in pts)
        attrs = f'data-series="{escape(name)}" data-metric="{escape(metric)}"'
        parts.append(f'<g class="series" {attrs}>')
        parts.append(
            f'<polyline points="{coords}" fill="none" stroke="{colours[name]}" stroke-width="{stroke}" {attrs}/>'
        )
        parts.extend(
            f'<circle cx="{_fmt(plot.sx(x))}" cy="{_fmt(plot.sy(y))}" r="{radius}" fill="{colours[name]}"/>'
            for x, y in pts
        )
        parts.append("</g>")
    return "".join(parts)


def _panel(
    metric: str, series: _Series, colours: dict[str, str], box: tuple[float, float, float, float], xr: tuple[int, int]
) -> str:
    """One metric's panel inside ``box`` (left, top, width, height), x range ``xr`` shared by all panels."""
    left, top, width, height = box
    ys = [y for pts in series.values() for _, y in pts]
    ticks = _nice_ticks(min(ys), max(ys))
    # min/max guard against float noise in the tolerant floor/ceil of _nice_ticks
    y_lo, y_hi = min(ticks[0], min(ys)), max(ticks[-1], max(ys))
    plot = _Plot(left + 50, top + 22, max(width - 64, 10.0), max(height - 58, 10.0), xr[0], xr[1], y_lo, y_hi)
    return "".join(
        [
            f'<g class="panel" data-metric="{escape(metric)}">',
            f'<text class="panel-title" x="{_fmt(left + width / 2)}" y="{_fmt(top + 13)}" text-anchor="middle" '
            f'font-size="12" font-weight="bold">{escape(metric)}</text>',
            _axes(plot),
            _y_ticks(plot, ticks, ticks[1] - ticks[0]),
            _x_ticks(plot),
            _curves(plot, metric, series, colours),
            "</g>",
        ]
    )


def _legend(names: list[str], colours: dict[str, str], width: int, top: float) -> tuple[str, float]:
    """Swatches in rows across the top (global first); returns the SVG and the height used."""
    parts, x, y = ['<g class="legend">'], 12.0, top + 6
    for name in names:
        label = name if len(name) <= 18 else name[:17] + "…"
        size = 20 + 6.5 * len(label)
        if x > 12 and x + size > width - 8:
            x, y = 12.0, y + 16
        stroke = "2.5" if name == GLOBAL else "1.3"
        parts.append(
            f'<line x1="{_fmt(x)}" y1="{_fmt(y)}" x2="{_fmt(x + 14)}" y2="{_fmt(y)}" '
            f'stroke="{colours[name]}" stroke-width="{stroke}"/>'
            f'<text x="{_fmt(x + 18)}" y="{_fmt(y + 4)}">{escape(label)}</text>'
        )
        x += size + 12
    parts.append("</g>")
    return "".join(parts), y - top + 12


def _empty(width: int, height: int, heading: str) -> str:
    return (
        f'{_svg_open(width, height)}{heading}<text x="{_fmt(width / 2)}" y="{_fmt(height / 2)}" '
        f'text-anchor="middle" fill="#6e7781">{escape(EMPTY_CHART_TEXT)}</text></svg>'
    )


def render_chart(points: list[Point], *, width: int = 640, panel_height: int = 190, title: str = "") -> str:
    """Render ``(metric, series, round, value)`` points as one SVG: a panel per metric, a shared legend."""
    metrics = _by_metric(points)
    heading = (
        f'<text x="{_fmt(width / 2)}" y="15" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>"
        if title
        else ""
    )
    if not metrics:
        return _empty(width, panel_height, heading)
    colours = _colours(metrics)
    legend, legend_height = _legend(sorted(colours, key=_series_key), colours, width, 22.0 if title else 4.0)
    xs = [x for series in metrics.values() for pts in series.values() for x, _ in pts]
    x_lo, x_hi = math.floor(min(xs)), math.ceil(max(xs))
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    columns = 1 if len(metrics) == 1 else 2
    panel_width = width / columns
    first = (22.0 if title else 4.0) + legend_height + 4
    rows = math.ceil(len(metrics) / columns)
    height = int(math.ceil(first + rows * panel_height + 4))
    panels = [
        _panel(
            metric,
            series,
            colours,
            ((i % columns) * panel_width, first + (i // columns) * panel_height, panel_width, panel_height),
            (x_lo, x_hi),
        )
        for i, (metric, series) in enumerate(metrics.items())
    ]
    return f"{_svg_open(width, height)}{heading}{legend}{''.join(panels)}</svg>"


def _last_values(metrics: dict[str, _Series]) -> dict[str, dict[str, float]]:
    """Per series (global first, then sites) and metric: the value at the last round with a finite value."""
    table: dict[str, dict[str, float]] = {}
    for metric, series in metrics.items():
        for name, pts in series.items():
            # the latest round wins; of two values for one round, the one given last
            _, (_, value) = max(enumerate(pts), key=lambda ip: (ip[1][0], ip[0]))
            table.setdefault(name, {})[metric] = value
    return {name: table[name] for name in sorted(table, key=_series_key)}


def render_summary(points: list[Point], rounds: int | None = None) -> str:
    """Render the final value of each series (rows, global first) and metric (columns) as an HTML table."""
    metrics = _by_metric(points)
    table = _last_values(metrics)
    if rounds is None:
        seen = [float(p[2]) for p in points if math.isfinite(float(p[2]))]
        rounds = int(max(seen)) if seen else 0
    th = 'style="text-align:left;padding:2px 10px;border-bottom:1px solid #d0d7de"'
    td = 'style="padding:2px 10px"'
    out = [
        '<table class="flip-summary" style="border-collapse:collapse;font-size:0.9em">',
        f'<caption style="text-align:left;font-weight:bold">final metrics (round {int(rounds)})</caption>',
        f"<thead><tr><th {th}>Series</th>",
        *(f"<th {th}>{escape(m)}</th>" for m in metrics),
        "</tr></thead><tbody>",
    ]
    if not table:
        out.append(f"<tr><td {td}><i>no metrics yet</i></td></tr>")
    for name, values in table.items():
        cells = "".join(f"<td {td}>{values[m]:.4g}</td>" if m in values else f"<td {td}>—</td>" for m in metrics)
        out.append(f'<tr data-series="{escape(name)}"><td {td}>{escape(name)}</td>{cells}</tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _badge(text: str, colour: str) -> str:
    return (
        f'<span style="background:{colour};color:#fff;border-radius:8px;'
        f'padding:1px 7px;font-size:0.85em">{escape(text)}</span>'
    )


def _cell(value: object) -> str:
    return "—" if value is None else escape(str(value))


def format_bytes(count: object) -> str:
    """``123456789`` as ``123.5 MB`` (decimal units, as network figures are given); "—" when unknown."""
    if not isinstance(count, int) or isinstance(count, bool):
        return "—"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} B"


def _traffic(row: dict[str, object]) -> str:
    if row.get("received_bytes") is None and row.get("sent_bytes") is None:
        return "—"
    return f"↓ {format_bytes(row.get('received_bytes'))} · ↑ {format_bytes(row.get('sent_bytes'))}"


def _device(row: dict[str, object]) -> str:
    device = str(row.get("device") or "")
    if not device:
        return "—"
    if not device.startswith("cuda") or row.get("gpu_peak_bytes") is None:
        return device
    seconds = row.get("gpu_seconds")
    gpu_time = f"{seconds:.1f} s" if isinstance(seconds, int | float) else "—"
    return f"{device} · {format_bytes(row.get('gpu_peak_bytes'))} peak · {gpu_time}"


def render_site_table(rows: list[dict[str, object]]) -> str:
    """Render per-site state as an HTML table (Site, Status, Samples, Round, Device, Traffic, Detail); Device is
    where the site ran its latest step (on a GPU: its peak memory and GPU seconds), Traffic the bytes the site
    received (the model) and sent (its update) in its latest step."""
    th = 'style="text-align:left;padding:2px 10px;border-bottom:1px solid #d0d7de"'
    td = 'style="padding:2px 10px"'
    out = ['<table class="flip-sites" style="border-collapse:collapse;font-size:0.9em">', "<thead><tr>"]
    out.extend(f"<th {th}>{h}</th>" for h in ("Site", "Status", "Samples", "Round", "Device", "Traffic", "Detail"))
    out.append("</tr></thead><tbody>")
    if not rows:
        out.append(f'<tr><td {td} colspan="7"><i>no sites yet</i></td></tr>')
    for row in rows:
        status = str(row.get("status", ""))
        detail = str(row.get("detail") or "")
        detail_html = escape(detail)
        if status == "failed" and detail:
            detail_html = f'<span style="color:#cf222e">{detail_html}</span>'
        out.append(
            f'<tr class="flip-site-{escape(status)}">'
            f"<td {td}>{escape(str(row.get('site', '')))}</td>"
            f"<td {td}>{_badge(status, _STATUS_COLOURS.get(status, '#6e7781'))}</td>"
            f"<td {td}>{_cell(row.get('samples'))}</td>"
            f"<td {td}>{_cell(row.get('round'))}</td>"
            f"<td {td}>{escape(_device(row))}</td>"
            f"<td {td}>{escape(_traffic(row))}</td>"
            f"<td {td}>{detail_html}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def render_header(name: str, run_id: str, status: str, round_: int, rounds: int, message: str = "") -> str:
    """Render the one-line run header, e.g. ``name · run abc · running · round 3/15``."""
    colour = _RUN_STATUS_COLOURS.get(status, "#24292f")
    pieces = [
        f"<b>{escape(name)}</b>",
        f"run {escape(run_id)}",
        f'<span style="color:{colour};font-weight:bold">{escape(status)}</span>',
        f"round {int(round_)}/{int(rounds)}",
    ]
    if message:
        pieces.append(escape(message))
    return '<div class="flip-header">' + " · ".join(pieces) + "</div>"
