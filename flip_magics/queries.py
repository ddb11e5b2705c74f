"""A federated query's answer as the notebook holds it: per-site and pooled pandas DataFrames.

No IPython here. The coordinator answers ``POST /api/queries`` with each site's released table
and the pooled one (``flip_core.query`` says their shapes); this module turns them into tidy
frames. A withheld value is ``<NA>`` (counts) or ``NaN`` (statistics), never a number; beside each
count, ``noise`` says the most it may be off (0: exact; a site moves its released counts by at most
its own, the same rows always by the same amount; a pooled count by at most the sum over the sites in
it); in ``stats``, ``noise`` is that of ``n`` and ``missing``. The sentences in ``notes`` say what was
withheld, by whom, what is perturbed and what is approximate.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

import pandas as pd

from flip_core.errors import RequestInvalid
from flip_core.query import QUANTILE_NAMES, QueryKind

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAT_FIELDS = ("n", "missing", "mean", "std")


class QueryWordsInvalid(RequestInvalid):
    """The words of a ``%flip_query`` do not name a statistic."""


@dataclass
class QueryResult:
    """``sites``: one row per site and cell (or column); ``pooled``: the same over all answering sites."""

    kind: QueryKind
    dataset: str
    where: str
    sites: pd.DataFrame
    pooled: pd.DataFrame
    refused: dict[str, str] = field(default_factory=dict)
    totals: dict[str, int | None] = field(default_factory=dict)  # rows counted, per site and "pooled"
    notes: list[str] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    mock: bool = False
    cohort: dict[str, Any] | None = None  # a cohort's entry in the hub's book: its sites, counts and hashes

    def wide(self, pooled: bool = True) -> pd.DataFrame:
        """A crosstab (or a count by two columns) as a grid: the first column down, the second across."""
        frame = self.pooled if pooled else self.sites
        dims = [c for c in frame.columns if c not in ("site", "count", "noise")]
        if len(dims) != 2:
            raise ValueError("wide() needs a count by exactly two columns")
        index = [*(["site"] if not pooled else []), dims[0]]
        return frame.pivot_table(index=index, columns=dims[1], values="count", aggfunc="first", dropna=False)

    def _repr_html_(self) -> str:
        title = html.escape(self.title())
        parts = [f"<b>{title}</b>", "<p>pooled</p>", self.pooled.to_html(index=False, na_rep="withheld")]
        parts += ["<p>by site</p>", self.sites.to_html(index=False, na_rep="withheld")]
        parts += [f"<p style='font-size:90%'>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(parts)

    def title(self) -> str:
        where = f" where {self.where}" if self.where else ""
        return f"{'MOCK ' if self.mock else ''}{self.kind} over {self.dataset}{where}"

    def plot(self, pooled: bool | None = None) -> Figure:
        """This answer as a matplotlib figure (``flip_magics.figures``): bars by site, overlaid histograms, a
        crosstab heat map, quantile glyphs; withheld values marked, never drawn as zero."""
        from flip_magics.figures import plot

        return plot(self, pooled=pooled)

    def __repr__(self) -> str:
        lines = [self.title(), "pooled:", self.pooled.to_string(index=False)]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


STATISTIC_HELP = (
    "count | count by COL[, COL, COL] | stats COL [COL ...] | hist COL | crosstab COL COL | missing [COL ...] | "
    "top condition|drug|procedure|measurement|observation"
)


def parse_statistic(words: list[str]) -> tuple[QueryKind, list[str]]:
    """``count by sex, cp`` and the like (the words after the dataset in ``%flip_query``) as a kind and columns."""
    tokens = [t for w in words for t in w.replace(",", " ").split()]
    if not tokens:
        raise QueryWordsInvalid(f"say which statistic: {STATISTIC_HELP}")
    try:
        kind = QueryKind(tokens[0].lower())
    except ValueError:
        raise QueryWordsInvalid(f"unknown statistic {tokens[0]!r}: use {STATISTIC_HELP}") from None
    columns = tokens[1:]
    if kind == QueryKind.COUNT and columns:
        if columns[0].lower() != "by" or len(columns) == 1:
            raise QueryWordsInvalid(f"count takes 'by' and column names: count by COL[, COL], not {' '.join(tokens)!r}")
        columns = columns[1:]
    return kind, columns


def _count_frame(table: dict[str, Any]) -> pd.DataFrame:
    dims: list[str] = list(table["dims"])
    levels: list[list[str]] = [list(x) for x in table["levels"]]
    rows = [dict(zip(dims, combo, strict=True)) for combo in product(*levels)] if dims else [{}]
    frame = pd.DataFrame(rows, columns=dims)
    frame["count"] = pd.array(table["cells"], dtype="Int64")
    noise = table.get("noise") or 0
    most = noise if isinstance(noise, list) else [noise] * len(table["cells"])  # pooled: per cell; a site: one
    frame["noise"] = pd.array(  # <NA> too where a site answered under differential privacy (no bound: its scale)
        [None if c is None or d is None else int(d) for c, d in zip(table["cells"], most, strict=True)],
        dtype="Int64",
    )
    return frame


def _stats_frame(table: dict[str, Any]) -> pd.DataFrame:
    rows = []
    for column, stats in table["columns"].items():
        row: dict[str, Any] = {"column": column, **{k: stats.get(k) for k in STAT_FIELDS}}
        quantiles = stats.get("quantiles") or {}
        row.update({q: quantiles.get(q) for q in QUANTILE_NAMES})
        row["noise"] = (stats.get("noise") or {}).get("n", table.get("noise", 0))  # pooled: per column
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["column", *STAT_FIELDS, *QUANTILE_NAMES, "noise"])
    for name in ("n", "missing", "noise"):
        frame[name] = pd.array([None if v is None or pd.isna(v) else int(v) for v in frame[name]], dtype="Int64")
    for name in ("mean", "std", *QUANTILE_NAMES):
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype(float)
    return frame


def frame(kind: QueryKind, table: dict[str, Any]) -> pd.DataFrame:
    if kind == QueryKind.STATS:
        return _stats_frame(table)
    counted = _count_frame(table)
    if kind == QueryKind.COHORT and "hash" in table:
        counted["hash"] = table["hash"]
    return counted


def result_from(answer: dict[str, Any], mock: bool = False) -> QueryResult:
    """The coordinator's answer to a query as a :class:`QueryResult`."""
    kind = QueryKind(answer["kind"])
    per_site = [frame(kind, site["table"]).assign(site=name) for name, site in answer["sites"].items()]
    sites = pd.concat(per_site, ignore_index=True) if per_site else pd.DataFrame()
    if not sites.empty:
        sites = sites[["site", *[c for c in sites.columns if c != "site"]]]
    pooled_table = answer.get("pooled")
    pooled = frame(kind, pooled_table) if pooled_table else pd.DataFrame()
    if kind == QueryKind.TOP:  # the most frequent first (withheld ones last)
        sites = _most_first(sites, ["site"])
        pooled = _most_first(pooled, [])
    return QueryResult(
        kind=kind,
        dataset=answer["dataset"],
        where=answer.get("where", ""),
        sites=sites,
        pooled=pooled,
        refused=dict(answer.get("refused", {})),
        totals={
            **{name: site["table"].get("total") for name, site in answer["sites"].items()},
            "pooled": (pooled_table or {}).get("total"),
        },
        notes=notes(kind, answer),
        raw=answer,
        mock=mock,
        cohort=answer.get("cohort"),
    )


def _most_first(frame: pd.DataFrame, groups: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    order = frame.sort_values([*groups, "count"], ascending=[True] * len(groups) + [False], na_position="last")
    return order.reset_index(drop=True)


def notes(kind: QueryKind, answer: dict[str, Any]) -> list[str]:
    """What a reader must know to read the numbers: refusals, withheld values, approximations."""
    out = [f"{site} did not answer: {why}" for site, why in answer.get("refused", {}).items()]
    thresholds = sorted({s.get("threshold") for s in answer["sites"].values() if s.get("threshold")})
    if thresholds:
        out.append(
            "values under each site's disclosure threshold ("
            + ", ".join(str(t) for t in thresholds)
            + ") are withheld (<NA>), as are values that would let one be computed back; a withheld value "
            "may be zero"
        )
    pooled = answer.get("pooled") or {}
    if kind == QueryKind.STATS:
        lists = [who for c in pooled.get("columns", {}).values() for who in (c.get("withheld_by") or {}).values()]
    else:
        lists = list(pooled.get("withheld_by") or [])
    if sites := sorted({s for names in lists for s in names}):
        out.append(f"pooled values are withheld where a site withheld its own ({', '.join(sites)})")
    private = {
        site: s["table"]["private"] for site, s in answer["sites"].items() if (s.get("table") or {}).get("private")
    }
    for site, figures in private.items():
        scale = figures.get("scale")
        spread = (
            f"Laplace noise of scale {scale:.3g} on each count (within ±{3 * scale:.3g} 19 times in 20)"
            if scale
            else (
                "Laplace noise on each column's count, sum and sum of squares, its values clamped to "
                f"{figures.get('bounds')}"
            )
        )
        out.append(
            f"{site} answered under differential privacy (epsilon {figures['epsilon']:g} per query): {spread}; its "
            f"budget for this project: {figures.get('spent', 0):.3g} of {figures.get('budget', 0):g} spent"
        )
    moved = {
        site: int((s.get("table") or {}).get("noise") or 0)
        for site, s in answer["sites"].items()
        if site not in private
    }
    if any(moved.values()):
        out.append(
            "counts are perturbed by at most ± their noise ("
            + ", ".join(f"{site} {d}" for site, d in moved.items())
            + "; pooled: the sum over the sites in a cell): the same rows always give the same count, and no "
            "difference of two counts is exact"
        )
    if kind == QueryKind.STATS and (any(moved.values()) or private):
        out.append(
            "pooled n, mean and std are approximate (each site's n is perturbed, and its mean and std by at most "
            "std/n); pooled quantiles are approximate (merged sketches)"
        )
    elif kind == QueryKind.STATS:
        out.append("pooled n, mean and std are exact; pooled quantiles are approximate (merged sketches)")
    return out
