"""A synthetic mock of a site's table, made at the site, for researchers to develop their cells against.

:func:`make_mock` samples every column on its own from a disclosure-controlled summary of that
column alone (no joint structure is kept): levels of at least ``threshold`` patients with rounded
frequencies, or a noised coarse histogram inside the column's 5th..95th percentiles, plus the
missing fraction when at least ``threshold`` values are missing. No real row and no group of fewer
than ``threshold`` patients is carried over. :func:`describe_mock` is the paragraph the notebook
shows next to a mock.

Pure: numpy and pandas, no I/O. The caller seeds it per site, dataset and threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from flip_core.errors import FlipError

MAX_LEVELS = 20  # a column with at most this many distinct values is sampled as levels
MAX_BINS = 10  # the histogram of a numeric column has at most this many bins
NOISE_SCALE = 1.0  # Laplace noise on each bin's count
MAX_REDRAWS = 100  # rounds of redrawing the mock rows that equal a real row, before refusing


class MockRefused(FlipError):
    """The site will not make a mock of this table; the sentence says why."""


@dataclass(frozen=True)
class _Plan:
    """How one mock column is drawn: from ``levels`` or from bins ``lows``..``highs``, or all missing."""

    missing: float  # the fraction of mock values that are missing
    weights: np.ndarray = field(default_factory=lambda: np.zeros(0))  # per level or per bin, summing to 1
    levels: tuple[Any, ...] = ()
    lows: np.ndarray = field(default_factory=lambda: np.zeros(0))
    highs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    whole: bool = False  # round the drawn values, inside ``bounds``
    bounds: tuple[float, float] = (0.0, 0.0)

    @property
    def empty(self) -> bool:
        return self.weights.size == 0


def make_mock(table: pd.DataFrame, threshold: int, seed: int) -> pd.DataFrame:
    """A mock of ``table`` that reveals no real row and no group of fewer than ``threshold`` patients.

    The mock has the same columns in the same order with the same dtypes, a fresh RangeIndex, and
    the real row count rounded to the nearest multiple of 10 (at least 10). Each column is sampled
    independently of the others:

    - a text, bool or categorical column, or one with at most 20 distinct values, is drawn from its
      levels that at least ``threshold`` rows have, with their frequencies rounded to 2 significant
      figures and renormalised; rarer levels never appear, and with no such level the column is all
      missing;
    - any other numeric column is drawn uniformly within the bins of a histogram of the real values
      inside the 5th..95th percentiles (10 equal bins, fewer when fewer than 10 * ``threshold``
      values lie inside), each bin's count noised with Laplace noise of scale 1 and the bins whose
      noised count is under ``threshold`` dropped; a column of whole numbers gets whole numbers; no
      value outside the 5th..95th percentiles is drawn, and with no bin left the column is all
      missing;
    - the real missing fraction, rounded to 2 decimals, is kept when at least ``threshold`` values
      are missing, else the mock column has none missing.

    A column that cannot hold a missing value (an int or bool dtype) but has to be all missing takes
    the nullable dtype of its kind (``Int64``, ``boolean``); a categorical dtype keeps only the
    levels released. Finally, every mock row that equals a real row in every column (missing equals
    missing) is drawn again, column by column, until none does.

    The same ``table``, ``threshold`` and ``seed`` give the same mock. Raises :class:`MockRefused`
    when the table has fewer than ``threshold`` rows, when ``threshold`` is under 1, or when the
    released summaries are so narrow that the mock cannot avoid copying real rows.
    """
    threshold = int(threshold)
    if threshold < 1:
        raise MockRefused(f"a mock needs a disclosure threshold of at least 1, not {threshold}")
    if len(table) < threshold:
        raise MockRefused(
            f"the table has {len(table)} rows, fewer than the site's threshold of {threshold}, "
            "so the site makes no mock of it"
        )
    size = max(10, int(math.floor(len(table) / 10 + 0.5)) * 10)
    if table.shape[1] == 0:
        return pd.DataFrame(index=pd.RangeIndex(size), columns=table.columns)
    rng = np.random.default_rng(seed)
    reals = [table.iloc[:, i] for i in range(table.shape[1])]
    plans = [_plan(column, threshold, rng) for column in reals]
    values = [_fill(plan, rng, size) for plan in plans]
    _avoid_real_rows(table, reals, plans, values, rng)
    return _frame(table, reals, plans, values)


def describe_mock() -> str:
    """One paragraph for the notebook: how a site's mock is made and what it is not."""
    return (
        "A mock is a synthetic table made at the site from its real table, with the same columns, "
        "dtypes and roughly the same number of rows (rounded to 10), so that a training cell can be "
        "written and debugged before it runs on real data. Each column is sampled on its own: a "
        "column with few distinct values from the levels that at least the site's threshold of "
        "patients share (rounded frequencies; rarer levels never appear), any other numeric column "
        "uniformly within the bins of a noised, coarse histogram of its middle 90% (never its "
        "extremes), and the missing fraction only where enough values are missing. No real row is "
        "ever copied into it. Because columns are sampled independently, a mock keeps no "
        "relationship between columns (no correlation, no link between features and outcome): a "
        "model trained on it learns nothing, and nothing computed on it is a result about the site's "
        "patients. Use it to check that code runs, never to draw conclusions."
    )


def _plan(column: pd.Series, threshold: int, rng: np.random.Generator) -> _Plan:
    missing_count = int(column.isna().sum())
    missing = round(missing_count / len(column), 2) if missing_count >= threshold else 0.0
    dtype = column.dtype
    numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
    if numeric and column.nunique(dropna=True) > MAX_LEVELS:
        return _bins_plan(column, threshold, missing, rng)
    return _levels_plan(column, threshold, missing)


def _levels_plan(column: pd.Series, threshold: int, missing: float) -> _Plan:
    counts = column.value_counts(dropna=True, sort=False)
    counts = counts[counts >= threshold]
    if counts.empty:
        return _Plan(missing=1.0)
    shares = counts.to_numpy(dtype=np.float64) / float(column.notna().sum())
    rounded = np.array([float(f"{share:.1e}") for share in shares])  # 2 significant figures
    return _Plan(missing=missing, weights=rounded / rounded.sum(), levels=tuple(counts.index.tolist()))


def _bins_plan(column: pd.Series, threshold: int, missing: float, rng: np.random.Generator) -> _Plan:
    numbers = column.to_numpy(dtype=np.float64, na_value=np.nan)
    numbers = numbers[np.isfinite(numbers)]
    low, high = (float(q) for q in np.percentile(numbers, [5, 95]))
    inside = numbers[(numbers >= low) & (numbers <= high)]
    bins = min(MAX_BINS, inside.size // threshold)
    if bins == 0:
        return _Plan(missing=1.0)
    if high > low:
        counts, edges = np.histogram(inside, bins=np.linspace(low, high, bins + 1))
    else:  # at least 90% of the values are one value
        counts, edges = np.array([inside.size]), np.array([low, high])
    noised = np.clip(counts + rng.laplace(0.0, NOISE_SCALE, size=counts.size), 0.0, None)
    kept = noised >= threshold
    if not kept.any():
        return _Plan(missing=1.0)
    whole = bool(np.all(numbers == np.round(numbers)))
    return _Plan(
        missing=missing,
        weights=noised[kept] / noised[kept].sum(),
        lows=edges[:-1][kept],
        highs=edges[1:][kept],
        whole=whole,
        bounds=(float(math.ceil(low)), float(math.floor(high))) if whole else (low, high),
    )


def _draw(plan: _Plan, rng: np.random.Generator, size: int) -> np.ndarray:
    """``size`` values drawn from the plan, none missing (unless the plan is empty), as an object array."""
    out = np.full(size, None, dtype=object)
    if plan.empty:
        return out
    chosen = rng.choice(plan.weights.size, size=size, p=plan.weights)
    if plan.levels:
        levels = np.empty(len(plan.levels), dtype=object)
        for i, level in enumerate(plan.levels):  # one by one: a level may itself be a sequence
            levels[i] = level
        out[:] = levels[chosen]
        return out
    numbers = rng.uniform(plan.lows[chosen], plan.highs[chosen])
    if plan.whole:
        numbers = np.clip(np.round(numbers), *plan.bounds)
    out[:] = numbers.tolist()
    return out


def _fill(plan: _Plan, rng: np.random.Generator, size: int) -> np.ndarray:
    """A mock column: drawn values with exactly the plan's missing fraction of them missing."""
    values = _draw(plan, rng, size)
    holes = rng.choice(size, size=int(round(plan.missing * size)), replace=False)
    values[holes] = None
    return values


def _redraw(plan: _Plan, rng: np.random.Generator, size: int) -> np.ndarray:
    """Fresh values for some rows: each missing with the plan's missing fraction as its chance."""
    values = _draw(plan, rng, size)
    values[rng.random(size) < plan.missing] = None
    return values


def _avoid_real_rows(
    table: pd.DataFrame,
    reals: list[pd.Series],
    plans: list[_Plan],
    values: list[np.ndarray],
    rng: np.random.Generator,
) -> None:
    """Redraw (in ``values``) every mock row that equals a real row, until none does; refuse if that fails."""
    real_rows = set(zip(*(_keys(column) for column in reals), strict=True))
    mock = _frame(table, reals, plans, values)
    rows = np.arange(len(mock))
    for _ in range(MAX_REDRAWS):
        keys = zip(*(_keys(mock.iloc[rows, i]) for i in range(mock.shape[1])), strict=True)
        rows = rows[np.fromiter((key in real_rows for key in keys), dtype=bool, count=rows.size)]
        if rows.size == 0:
            return
        for plan, column in zip(plans, values, strict=True):
            column[rows] = _redraw(plan, rng, rows.size)
        mock = _frame(table, reals, plans, values)
    raise MockRefused(
        f"{rows.size} mock rows still equalled real rows after {MAX_REDRAWS} redraws: the levels this "
        "table releases are too few to make a mock without copying real rows, so the site makes none"
    )


def _keys(column: pd.Series) -> list[Any]:
    """A column's values for comparing rows: Python objects, every kind of missing as None."""
    out = column.astype(object).to_numpy(copy=True)
    out[column.isna().to_numpy()] = None
    return list(out.tolist())


def _frame(table: pd.DataFrame, reals: list[pd.Series], plans: list[_Plan], values: list[np.ndarray]) -> pd.DataFrame:
    columns = [_column(real, plan, column) for real, plan, column in zip(reals, plans, values, strict=True)]
    mock = pd.concat(columns, axis=1, ignore_index=True)
    mock.columns = table.columns
    return mock


def _column(real: pd.Series, plan: _Plan, values: np.ndarray) -> pd.Series:
    """The drawn values as a column of the real column's dtype (see :func:`make_mock` for the exceptions)."""
    dtype = real.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return pd.Series(pd.Categorical(values, categories=list(plan.levels), ordered=dtype.ordered))
    if isinstance(dtype, np.dtype) and dtype.kind in "iub" and any(v is None for v in values):
        nullable = "boolean" if dtype.kind == "b" else f"{'U' if dtype.kind == 'u' else ''}Int{dtype.itemsize * 8}"
        return pd.Series(values, dtype=nullable)
    return pd.Series(values, dtype=dtype)
