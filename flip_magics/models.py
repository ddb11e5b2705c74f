"""A model fitted across sites as the notebook holds it (``%flip_model glm``, ``FlipClient.glm``).

No IPython here. The hub answers ``POST /api/glm`` with the coefficients (statsmodels' estimate, standard error, z,
p-value and 95% interval), each site's complete rows, the iterations and the sites that said no; this module makes
them a table, a few sentences a reader needs, and a forest plot (static in an executed notebook, as every FLIP
figure). A binomial model's coefficients are log odds ratios and a Poisson model's log rate ratios: the table and
the plot give them exponentiated too (``odds_ratio``, ``rate_ratio``). A Cox model (``POST /api/survival``, kind
``cox``: ``family`` "cox") is one too: its coefficients are log hazard ratios (``hazard_ratio``), its notes say how
it was fitted (stratified by site, or one baseline hazard over binned times) and the proportional-hazards check.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RATIO = {"binomial": "odds_ratio", "poisson": "rate_ratio", "cox": "hazard_ratio"}
COLUMNS = ["name", "estimate", "se", "z", "p", "ci_low", "ci_high"]


@dataclass
class ModelResult:
    """``coefficients``: one row per parameter; ``sites``: each site's complete rows the fit used."""

    family: str
    formula: str
    dataset: str
    coefficients: pd.DataFrame
    sites: pd.DataFrame
    refused: dict[str, str] = field(default_factory=dict)
    iterations: int = 0
    rows: int = 0
    deviance: float = math.nan
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def title(self) -> str:
        if self.family == "cox":
            time, event = self.raw.get("time"), self.raw.get("event")
            return f"Cox model {self.formula}: {time} until {event} over {self.dataset}"
        return f"{self.family} GLM {self.formula} over {self.dataset}"

    def _repr_html_(self) -> str:
        parts = [
            f"<b>{html.escape(self.title())}</b>",
            self.coefficients.to_html(index=False, float_format=lambda v: f"{v:.4g}"),
        ]
        parts += ["<p>rows by site</p>", self.sites.to_html(index=False)]
        parts += [f"<p style='font-size:90%'>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(parts)

    def __repr__(self) -> str:
        lines = [self.title(), self.coefficients.to_string(index=False)] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)

    def plot(self, intercept: bool = False) -> Figure:
        """A forest plot: each coefficient (a ratio, for binomial and Poisson models, on a log axis) with its 95%
        interval; the intercept left out unless asked for."""
        return forest(self, intercept=intercept)


def model_from(answer: dict[str, Any]) -> ModelResult:
    """The hub's answer to ``POST /api/glm`` as a :class:`ModelResult`."""
    family = str(answer["family"])
    table = pd.DataFrame(answer["coefficients"], columns=COLUMNS)
    if family in RATIO:
        for column, source in ((RATIO[family], "estimate"), ("ratio_low", "ci_low"), ("ratio_high", "ci_high")):
            table[column] = table[source].map(math.exp)
    sites = pd.DataFrame(
        [{"site": site, "rows": body["rows"]} for site, body in answer["sites"].items()], columns=["site", "rows"]
    )
    return ModelResult(
        family=family,
        formula=str(answer["formula"]),
        dataset=str(answer["dataset"]),
        coefficients=table,
        sites=sites,
        refused=dict(answer.get("refused", {})),
        iterations=int(answer["iterations"]),
        rows=int(answer["rows"]),
        deviance=float(answer["deviance"]),
        notes=notes(answer),
        raw=answer,
    )


def notes(answer: dict[str, Any]) -> list[str]:
    """What a reader must know: the sites in the fit, those that said no, and how it was fitted."""
    if answer["family"] == "cox":
        return cox_notes(answer)
    sites = ", ".join(answer["sites"])
    out = [
        f"fitted exactly over {answer['rows']} complete rows at {sites} (iteratively reweighted least squares on the "
        f"sites' summed statistics, {answer['iterations']} iterations): the maximum-likelihood fit of the pooled rows"
    ]
    out += [f"{site} is not in the fit: {why}" for site, why in answer.get("refused", {}).items()]
    if answer["family"] == "gaussian":
        out.append(f"standard errors use the scale (residual variance) {answer['scale']:.4g}, as statsmodels does")
    return out + _level_notes(answer)


def _level_notes(answer: dict[str, Any]) -> list[str]:
    return [
        f"C({column}): each level against {levels[0]} (the first, as every site sorts them)"
        for column, levels in (answer.get("levels") or {}).items()
        if levels
    ]


def cox_notes(answer: dict[str, Any]) -> list[str]:
    """A Cox model's: its rows and events, how it was fitted (stratified, exact; or binned, approximate), those that
    said no, and the proportional-hazards check, per covariate and global."""
    sites = ", ".join(answer["sites"])
    out = [
        f"fitted over {answer['rows']} complete rows with {answer['events']} events at {sites} (Newton-Raphson on the "
        f"sites' summed statistics, {answer['iterations']} iterations): hazard ratios are exp(coefficient)"
    ]
    out += [f"{site} is not in the fit: {why}" for site, why in answer.get("refused", {}).items()]
    if answer.get("binned"):
        edges = ", ".join(f"{float(e):g}" for e in answer.get("kept_edges") or answer.get("edges") or [])
        out.append(
            f"one baseline hazard over the times binned at the edges {edges} (each time taken as the end of its bin, "
            "ties in a bin by Efron's method): an approximation, the binning; exact for the binned times"
        )
    else:
        out.append(
            "stratified by site (each site its own baseline hazard) over the exact times, only sums leaving a site: "
            "the pooled stratified fit, exactly"
        )
    return out + _level_notes(answer) + hazards_notes(answer)


def hazards_notes(answer: dict[str, Any]) -> list[str]:
    """The proportional-hazards check's lines (a small p: a hazard ratio that changes over time), or why none."""
    test = answer.get("hazards_test")
    if not answer.get("binned") and not answer.get("edges"):
        return ["no proportional-hazards check: it is made over binned times (give edges, or fit it binned)"]
    if not test or "names" not in test:
        return [f"no proportional-hazards check: {(test or {}).get('undefined', 'the hub made none')}"]
    out = [
        f"proportional hazards, {name}: chi-square {statistic:.4g} on 1 df, p = {p:.3g}"
        for name, statistic, p in zip(test["names"], test["statistics"], test["pvalues"], strict=True)
    ]
    out.append(
        f"proportional hazards, global: chi-square {test['global_statistic']:.4g} on {test['global_df']} df, "
        f"p = {test['global_pvalue']:.3g} (Grambsch and Therneau's score test over the bins' event ranks"
        + (", each site its own stratum" if not answer.get("binned") else "")
        + "; a small p: a hazard ratio that changes over time)"
    )
    return out


def forest(result: ModelResult, intercept: bool = False) -> Figure:
    """The coefficients with their 95% intervals, one line each, the null value marked."""
    from matplotlib.figure import Figure

    table = result.coefficients
    if not intercept:
        table = table[table["name"] != "Intercept"]
    ratio = result.family in RATIO
    estimate, low, high = ("estimate", "ci_low", "ci_high") if not ratio else (RATIO[result.family], "ratio_low",
                                                                              "ratio_high")  # fmt: skip
    figure = Figure(figsize=(6.4, 0.45 * len(table) + 1.4))
    axes = figure.add_subplot()
    y = list(range(len(table)))[::-1]
    axes.hlines(y, table[low], table[high], color="#1f4e79", linewidth=2)
    axes.plot(table[estimate], y, "s", color="#1f4e79")
    axes.axvline(1.0 if ratio else 0.0, color="grey", linestyle="--", linewidth=1)
    if ratio:
        axes.set_xscale("log")
    axes.set_yticks(y, list(table["name"]))
    axes.set_xlabel(RATIO[result.family].replace("_", " ") + " (95% CI)" if ratio else "coefficient (95% CI)")
    axes.set_title(f"{result.formula} ({result.rows} rows, {len(result.sites)} sites)", fontsize=10)
    figure.tight_layout()
    return figure


__all__ = ["RATIO", "ModelResult", "cox_notes", "forest", "hazards_notes", "model_from", "notes"]
