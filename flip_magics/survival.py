"""Kaplan-Meier curves across sites as the notebook holds them (``%flip_survival km``, ``FlipClient.km``).

No IPython here. The hub answers ``POST /api/survival`` (kind ``km``) with each group's curve at the edges every
site kept (the i-th entry at ``time[i]``, the end of a kept bin: the rows at risk at that bin's start, its events
and censorings, S(t) at its end, the 95% band), the log-rank test across the groups, each site's rows and the bins
it merged, and the sites that said no. This module makes them a tidy table, the sentences a reader needs, and a
figure: step curves with their bands and the numbers at risk beneath (static, as every FLIP figure; no censoring is
marked: no exact time leaves a site). A Cox model's answer is a :class:`flip_magics.models.ModelResult`.
"""

from __future__ import annotations

import html
import math
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CURVE_COLUMNS = ["group", "time", "at_risk", "events", "censored", "survival", "ci_low", "ci_high"]
MAX_RISK_COLUMNS = 12  # numbers at risk beyond this many edges: every k-th edge's, or they run into each other
RISK_TITLE = "number at risk"
CAPTION_CHARS = 110  # the caption's lines over the curves, at 8 points across the figure
CAPTION = "95% band shaded (Greenwood, log-log); censorings not marked: no exact time leaves a site"


@dataclass
class SurvivalResult:
    """``curves``: one row per group and kept edge; ``logrank``: the test across the groups (None: one curve);
    ``sites``: each site's rows; ``refused``: the sites not in it, with their sentences."""

    dataset: str
    time: str
    event: str
    group: str | None
    edges: list[float]
    kept_edges: list[float]
    curves: pd.DataFrame
    logrank: dict[str, Any] | None
    sites: pd.DataFrame
    refused: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    kind: str = "km"

    def title(self) -> str:
        by = f" by {self.group}" if self.group else ""
        return f"Kaplan-Meier: {self.time} until {self.event}{by} over {self.dataset}"

    def levels(self) -> list[str]:
        """The curves' groups, in the hub's order (``"all"`` for one curve)."""
        return list(dict.fromkeys(str(g) for g in self.curves["group"]))

    def at_risk(self) -> pd.DataFrame:
        """The numbers at risk: a row per group, a column per kept edge (the rows whose binned time is at least
        that edge: at risk at its bin's start)."""
        wide = self.curves.pivot(index="group", columns="time", values="at_risk")
        return wide.reindex(self.levels())

    def _repr_html_(self) -> str:
        parts = [f"<b>{html.escape(self.title())}</b>", "<p>number at risk</p>", self.at_risk().to_html()]
        parts += ["<p>curves</p>", self.curves.to_html(index=False, float_format=lambda v: f"{v:.4g}")]
        parts += ["<p>rows by site</p>", self.sites.to_html(index=False)]
        parts += [f"<p style='font-size:90%'>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(parts)

    def __repr__(self) -> str:
        lines = [self.title(), self.curves.to_string(index=False)] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self) -> Figure:
        """The Kaplan-Meier figure: a step curve per group from S=1, its 95% band, the numbers at risk beneath."""
        return km_figure(self)


def survival_from(answer: dict[str, Any]) -> SurvivalResult:
    """The hub's answer to ``POST /api/survival`` (kind ``km``) as a :class:`SurvivalResult`."""
    rows = [
        {"group": str(level), **{c: curve[c][i] for c in CURVE_COLUMNS[1:]}}
        for level, curve in answer["curves"].items()
        for i in range(len(curve["time"]))
    ]
    curves = pd.DataFrame(rows, columns=CURVE_COLUMNS)
    for column in ("at_risk", "events", "censored"):
        curves[column] = curves[column].astype("int64")
    sites = pd.DataFrame(
        [{"site": site, "rows": body["rows"]} for site, body in answer["sites"].items()], columns=["site", "rows"]
    )
    return SurvivalResult(
        dataset=str(answer["dataset"]),
        time=str(answer["time"]),
        event=str(answer["event"]),
        group=answer.get("group"),
        edges=[float(e) for e in answer.get("edges", [])],
        kept_edges=[float(e) for e in answer.get("kept_edges", [])],
        curves=curves,
        logrank=answer.get("logrank"),
        sites=sites,
        refused=dict(answer.get("refused", {})),
        rows=int(answer["rows"]),
        notes=km_notes(answer),
        raw=answer,
    )


def edges_text(edges: list[float]) -> str:
    return ", ".join(f"{e:g}" for e in edges)


def km_notes(answer: dict[str, Any]) -> list[str]:
    """What a reader must know: the rows and sites, the bins each site merged, who said no, that the times are
    binned, and the log-rank test."""
    out = [f"{answer['rows']} rows at {', '.join(answer['sites']) or 'no site'}"]
    out += [f"{site}: {note}" for site, body in answer["sites"].items() for note in body.get("notes", [])]
    out += [f"{site} is not in the analysis: {why}" for site, why in answer.get("refused", {}).items()]
    asked, kept = [float(e) for e in answer.get("edges", [])], [float(e) for e in answer.get("kept_edges", [])]
    merged = f" (of {edges_text(asked)} asked for: the sites' merges)" if asked and kept != asked else ""
    out.append(
        f"no exact time left a site: times are binned at the edges {edges_text(kept)}{merged}, each taken as the end "
        "of its bin; the curve is exact for the binned times"
    )
    out.append(logrank_line(answer.get("logrank"), answer.get("group")))
    return out


def logrank_line(test: dict[str, Any] | None, group: str | None) -> str:
    if test is None:
        return f"one level of {group}: no log-rank test" if group else "one curve: no log-rank test"
    counts = "; ".join(f"{level} {n:g} observed, {test['expected'][level]:.4g} expected"
                       for level, n in test["observed"].items())  # fmt: skip
    return (
        f"log-rank test across the levels of {group}: chi-square {test['statistic']:.4g} on {test['df']} df, "
        f"p = {test['p']:.3g} (events: {counts})"
    )


def km_figure(result: SurvivalResult) -> Figure:
    """Each group's curve as steps (S=1 until the first kept edge, then S at each edge's end), its band shaded,
    and under the axes the numbers at risk at the kept edges (every k-th where there are many)."""
    from matplotlib.figure import Figure

    levels = result.levels()
    figure = Figure(figsize=(7.0, 4.6 + 0.25 * len(levels)), layout="constrained")
    curve_axes, risk_axes = figure.subplots(2, 1, height_ratios=[4.0, 0.5 + 0.3 * len(levels)])
    kept = [float(t) for t in result.curves["time"].drop_duplicates().sort_values()] or [0.0]
    start = min(0.0, kept[0])
    for i, level in enumerate(levels):
        one = result.curves[result.curves["group"] == level]
        xs = [start, *one["time"]]
        colour = f"C{i % 10}"
        label = f"{level} (n={one['at_risk'].iloc[0]})" if len(one) else level
        curve_axes.step(xs, [1.0, *one["survival"]], where="post", color=colour, linewidth=1.8, label=label)
        curve_axes.lines[-1].set_gid(f"km:{level}")
        band = curve_axes.fill_between(
            xs, [1.0, *one["ci_low"]], [1.0, *one["ci_high"]], step="post", color=colour, alpha=0.2, linewidth=0
        )
        band.set_gid(f"band:{level}")
    span = (kept[-1] - start) or 1.0
    limits = (start - 0.02 * span, kept[-1] + 0.02 * span)
    step = math.ceil(len(kept) / MAX_RISK_COLUMNS)
    shown = kept[::step]
    curve_axes.set(xlim=limits, ylim=(0.0, 1.03), ylabel="survival", xlabel=result.time)
    curve_axes.set_xticks(shown, [f"{t:g}" for t in shown], fontsize=8 if len(shown) > 8 else None)
    if result.group:
        curve_axes.legend(loc="lower left", fontsize=8, frameon=False, title=result.group)
    subtitle = [] if result.logrank is None else [f"log-rank p = {result.logrank['p']:.3g}"]
    subtitle += ["not in it: " + ", ".join(sorted(result.refused))] if result.refused else []
    caption = textwrap.wrap("; ".join(subtitle), CAPTION_CHARS) + [CAPTION]
    curve_axes.set_title("\n".join(caption), fontsize=8, loc="left", color="#404040")
    _risk_table(risk_axes, result, levels, shown, limits)
    if step > 1:
        risk_axes.set_title(f"{RISK_TITLE} (at one kept edge in {step})", fontsize=9, loc="left")
    figure.suptitle(result.title(), fontsize=11)
    return figure


def _risk_table(axes: Any, result: SurvivalResult, levels: list[str], shown: list[float], limits: Any) -> None:
    """The numbers at risk under the curves: a row per group (the first on top), a column per shown edge, each
    number centred under its edge."""
    wide = result.at_risk()
    for row, level in enumerate(levels):
        for t in shown:
            value: Any = wide.at[level, t] if t in wide.columns else math.nan
            text = "" if pd.isna(value) else f"{int(value)}"
            axes.text(t, row, text, ha="center", va="center", fontsize=8, color=f"C{row % 10}", gid=f"{level}@{t:g}")
    axes.set(xlim=limits, ylim=(len(levels) - 0.5, -0.5))
    axes.set_yticks(range(len(levels)), levels, fontsize=8)
    axes.tick_params(bottom=False, labelbottom=False, left=False)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_title(RISK_TITLE, fontsize=9, loc="left")
    axes.set_gid(RISK_TITLE)


__all__ = ["CURVE_COLUMNS", "RISK_TITLE", "SurvivalResult", "km_figure", "km_notes", "survival_from"]
