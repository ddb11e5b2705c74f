"""A column's statistics as a site releases them (``stats``): n, missing, mean, std, quantiles and a sketch, each
only where it gives no small count and no patient's value away (``site_agent.queries.statistics`` says the rules
in full, and asks this module for the column statistics of a query).

Pure: numpy, no I/O.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import numpy as np
import pandas as pd

from flip_core.query import QUANTILE_NAMES, QUANTILES

MAX_CENTROIDS = 100  # the most chunks a column's sketch is cut into
FEW_VALUES = 10  # a column taking at most this many values in a cohort has each value's count checked
DOMINANCE_P = 10  # the p% rule: a sum whose rest is under p% of its largest value is not released


class Ledger(Protocol):
    """The site's ledger as one query's statistics use it (``site_agent.queries.statistics._Ledger``)."""

    noise: int

    def blocked(self, sets: list[tuple[np.ndarray, str]], tag: str = "") -> list[bool]: ...

    def release(self, rows: np.ndarray, what: str, tag: str = "") -> int: ...

    def jitters(self, rows: np.ndarray, whats: list[str]) -> list[float]: ...


def floats(column: pd.Series) -> np.ndarray:
    """A numeric column as float64, missing values as NaN."""
    return np.asarray(column.astype("float64").to_numpy(), dtype=np.float64)


def column_statistics(
    columns: list[str],
    table: pd.DataFrame,
    rows: np.ndarray,
    threshold: int,
    ledger: Ledger,
) -> dict[str, Any]:
    """Each column's statistics (:func:`_one_column`) and the cohort's size, as they leave.

    A column's values are a set of rows in the ledger of their own kind (``values of COLUMN``): their magnitudes are
    withheld where they are within the threshold of values of the same column released before, or of a sum or
    difference of two (two means over nearly the same rows give the rows between them away). Its ``n`` leaves as a
    count of that set, moved by its cell key; its ``missing`` as the count of the rows without a value, withheld
    under the threshold where counts move (where they leave exact, the cohort's size less ``n`` would tell it anyway,
    so it leaves). Where counts move, so do the magnitudes (:func:`_moved`)."""
    cohort = np.flatnonzero(rows)
    n = cohort.size
    stats = {}
    for name in columns:
        values = floats(table[name])[cohort]
        finite = np.isfinite(values)
        present, lacking = cohort[finite], cohort[~finite]
        entry = _one_column(values, threshold, exact=ledger.noise <= 0)
        tag = f"values of {name}"
        if entry["n"] is not None and ledger.blocked([(present, f"{name} values")], tag)[0]:
            entry = _one_column(values[:0], threshold)  # all withheld
        if entry["n"] is not None:
            entry["n"] = ledger.release(present, f"{name} values", tag)
            if ledger.noise <= 0:
                entry["missing"] = int(lacking.size)
            else:
                entry = _moved(entry, values[finite], present, ledger)
                if lacking.size >= max(threshold, 1) and not ledger.blocked([(lacking, f"{name} missing")])[0]:
                    entry["missing"] = ledger.release(lacking, f"{name} missing")
        stats[name] = entry
    total = None
    if n >= threshold and not ledger.blocked([(cohort, "total")])[0]:
        total = ledger.release(cohort, "total")
    return {"columns": stats, "total": total, "noise": ledger.noise}


def _one_column(values: np.ndarray, threshold: int, exact: bool = True) -> dict[str, Any]:
    """n, mean, std, quantiles and sketch of one column's cohort values, exact (``missing``: None, for the caller).

    ``n`` only where it reaches the threshold. The magnitudes (mean, std, quantiles, sketch) only where
    :func:`_magnitudes` says so; each quantile (a value of the column: no interpolation) only with at least the
    threshold's number of values on either side of it.
    """
    present = np.sort(values[np.isfinite(values)])
    n = int(present.size)
    withheld: dict[str, Any] = {"missing": None, "mean": None, "std": None, "quantiles": None, "sketch": None}
    if n < threshold or n == 0:  # (n == 0 only with a threshold of 0: nothing to describe)
        return {"n": None if n < threshold else 0, **withheld}
    moments, sketched = _magnitudes(present, threshold, exact)
    if not moments:
        return {"n": n, **withheld}
    chunks = np.array_split(present, min(MAX_CENTROIDS, max(1, n // max(threshold, 1))))
    sketch = [[_number(chunk.mean()), int(chunk.size)] for chunk in chunks] if sketched else None
    levels = np.quantile(present, QUANTILES, method="inverted_cdf")
    quantiles: dict[str, float | None] = {
        name: _number(q) if min(level, 1 - level) * n >= threshold else None
        for name, level, q in zip(QUANTILE_NAMES, QUANTILES, levels, strict=True)
    }
    return {
        "n": n,
        "missing": None,
        "mean": _number(present.mean()),
        "std": _number(present.std(ddof=1)) if n >= 2 else None,
        "quantiles": None if all(q is None for q in quantiles.values()) else quantiles,
        "sketch": None if sketch is None or any(c[0] is None for c in sketch) else sketch,
    }


def _moved(entry: dict[str, Any], values: np.ndarray, rows: np.ndarray, ledger: Ledger) -> dict[str, Any]:
    """A column's magnitudes as they leave where counts move (``entry["n"]`` already moved): an exact mean or std
    would give the exact count back (a mean of whole numbers times the right count is whole; so is ``n (n - 1)``
    times a variance), so each moves by at most ``std / n`` (a part of one patient's own effect on it), fixed by the
    values' cell key; the sketch's centroids each weigh the same share of the released ``n`` (their sizes would
    tell ``n``), and each one's mean moves by at most its spread over its size."""
    exact = values.size
    std = entry["std"]
    if exact < 2 or std is None or entry["mean"] is None:
        return entry
    scale = float(std) / exact
    moved = dict(entry)
    centroids = len(entry["sketch"] or [])
    on_mean, on_std, *on_sketch = ledger.jitters(rows, ["mean", "std", *(f"sketch {i}" for i in range(centroids))])
    moved["mean"] = _number(entry["mean"] + scale * on_mean)
    moved["std"] = _number(max(0.0, std + scale * on_std))
    if entry["sketch"]:
        chunks = np.array_split(np.sort(values), len(entry["sketch"]))
        share = entry["n"] / len(chunks)
        moved["sketch"] = [
            [_number(mean + float(np.ptp(chunk)) / chunk.size * on_sketch[i]), share]
            for i, ((mean, _), chunk) in enumerate(zip(entry["sketch"], chunks, strict=True))
        ]
    return moved


def _magnitudes(present: np.ndarray, threshold: int, exact: bool = True) -> tuple[bool, bool]:
    """Whether a column's mean, std and quantiles, and whether its sketch, can leave without giving a small count
    away. With at most three values, ``n``, the mean and the std are three equations in their three counts: each
    value must be held by at least ``threshold`` rows. With at most ``FEW_VALUES``, the sketch's consecutive chunks
    of sorted values give each value's count away: the same, for the sketch. With more, at least ``threshold``
    values must differ from the most common one (a cohort padded with rows of one known value and one patient).
    And where counts leave ``exact``, whatever the number of values, the rows holding a rare value (one fewer than
    ``threshold`` rows hold) must be none or at least ``threshold``: a cohort padded with rows of several known
    values, each counted on its own, and one patient (whose value is rare there) gives the patient's value as n
    times the mean less the known sums (the ledger sees that cohort as the counted sets and the patient, unless rows
    without the column pad it). Where counts move, each known sum is off by its value times the noise."""
    if _dominated(present):
        return False, False
    _, counts = np.unique(present, return_counts=True)
    rare = bool(counts.min() < threshold)
    if counts.size <= 3:
        return not rare, not rare
    if exact and 0 < int(counts[counts < threshold].sum()) < threshold:
        return False, False
    if counts.size <= FEW_VALUES:
        return True, not rare
    spread = bool(present.size - counts.max() >= threshold)
    return spread, spread


def _dominated(present: np.ndarray) -> bool:
    """The p% rule of magnitude tables (tau-ARGUS, sdcMicro), for a column of values none below zero: its sum
    (``n`` times the mean) is sensitive where all but its two largest values add up to less than ``DOMINANCE_P``
    percent of the largest, so that the sum says the largest value to within that (the second largest's holder
    could say it closer still)."""
    if present.size < 2 or present.min() < 0:
        return False
    largest, second = np.sort(present)[-2:][::-1]
    rest = float(present.sum()) - float(largest) - float(second)
    return rest < DOMINANCE_P / 100 * float(largest)


def _number(value: Any) -> float | None:
    """A plain float for JSON, None where it overflowed."""
    number = float(value)
    return number if math.isfinite(number) else None


__all__ = ["DOMINANCE_P", "FEW_VALUES", "MAX_CENTROIDS", "Ledger", "column_statistics", "floats"]
