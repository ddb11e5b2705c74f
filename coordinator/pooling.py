"""The coordinator's side of a federated query: pooling what the sites released into one answer.

:func:`pool` takes the ``table`` of each site's OK reply (shapes in ``flip_core.query``) and
returns one table of the same shape, plus ``sites`` (who is in it):

- **count tables**: each dim's levels are the union over the sites (numbers numerically, then
  text, then ``OTHER_LEVEL``, then ``MISSING_LEVEL``; a histogram's and a missing-table's levels keep
  the sites' order). A site that does not list a level has no row with it (a site names every value
  enough rows of its whole table hold), so it adds 0 there; but a site that lists ``OTHER_LEVEL`` in a
  dim (values too few of its rows hold to be named) may hold rows of a level it does not list, so the
  pooled cells of such levels are withheld by it. A pooled cell is withheld when *any* site that lists it withheld its
  own cell: the pooled value minus the other sites' released cells would give that site's cell
  back. ``withheld_by`` (parallel to ``cells``) names those sites; ``total`` is the sum of the sites'
  totals, withheld if any site's is. ``noise`` (parallel to ``cells``) is the most a pooled cell can be off:
  the sum of the ``noise`` of the sites whose released counts are in it (each site moves its counts by at most
  its own, ``site_agent.queries.perturbation``); ``total_noise`` the same of the total. A site that answered
  under differential privacy has no bound: where it is in a cell, ``noise`` is None, and ``private`` lists
  such sites with their epsilon and the noise's scale.
- **column statistics**: ``n`` and ``missing`` are sums (``noise``: the most each can be off);
  ``mean`` and ``std`` are pooled from each site's n, mean and std with Chan, Golub and LeVeque's
  parallel update of n, mean and M2 = std²·(n−1), exact where every site's counts are, and marked
  ``approximate`` where any site moved its counts (and with them its mean and std, a little); the
  quantiles are read off the sites' merged sketches and marked ``approximate``. Anything a site
  withheld makes the pooled value withheld (``withheld_by`` per field says whose).

Pure: numpy, no I/O.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flip_core.errors import FlipError
from flip_core.query import OTHER_LEVEL, QUANTILE_NAMES, QUANTILES, QueryKind, level_key

ORDERED_KINDS = (QueryKind.HIST, QueryKind.MISSING)  # levels kept in the sites' order, not sorted
STAT_FIELDS = ("n", "missing", "mean", "std", "sketch")


class PoolingError(FlipError):
    """The sites' answers cannot be pooled (none came, or they disagree on the table's shape)."""


def pool(kind: QueryKind, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One pooled table from the released ``tables`` of the sites that answered (site name → table)."""
    if not tables:
        raise PoolingError("no site released an answer to this query, so there is nothing to pool")
    try:
        if kind is QueryKind.STATS:
            return _pool_statistics(tables)
        return _pool_counts(kind, tables)
    except (KeyError, IndexError, TypeError, ValueError) as error:  # a site's table not in the shape it should be
        raise PoolingError(
            f"a site's answer is not a {kind.value} table that can be pooled ({type(error).__name__}: {error}); "
            "check that every site runs the same FLIP version"
        ) from error


def _sum(counts: list[Any]) -> int | None:
    """The sum of the sites' counts; None if any site withheld its own."""
    total = 0
    for count in counts:
        if count is None:
            return None
        total += int(count)
    return total


def _union(lists: list[list[str]], ordered: bool) -> list[str]:
    seen = list(dict.fromkeys(label for labels in lists for label in labels))
    return seen if ordered else sorted(seen, key=level_key)


def _check_same(tables: dict[str, dict[str, Any]], key: str) -> Any:
    values = {site: table.get(key) for site, table in tables.items()}
    first = next(iter(values.values()))
    differ = sorted(site for site, value in values.items() if value != first)
    if differ:
        raise PoolingError(
            f"the sites answered with different {key} ({', '.join(differ)} differ from {next(iter(values))}); "
            "ask the query again so that every site answers the same one"
        )
    return first


def _pool_counts(kind: QueryKind, tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    dims = list(_check_same(tables, "dims") or [])
    edges = _check_same(tables, "edges") if kind is QueryKind.HIST else None
    levels = [
        _union([table["levels"][d] for table in tables.values()], kind in ORDERED_KINDS) for d in range(len(dims))
    ]
    shape = tuple(len(labels) for labels in levels)
    sums = np.zeros(math.prod(shape), dtype=np.int64)
    withheld_by: list[list[str]] = [[] for _ in range(sums.size)]
    noise: list[int | None] = [0] * sums.size
    for site, table in tables.items():
        for target, cell in zip(_targets(site, table, levels, shape).tolist(), table["cells"], strict=True):
            if cell is None:
                withheld_by[target].append(site)
            else:
                sums[target] += int(cell)
                noise[target] = _plus(noise[target], _noise(table))
    if kind not in ORDERED_KINDS:
        _unnamed(tables, levels, shape, withheld_by)
    totals = [table.get("total") for table in tables.values()]
    pooled: dict[str, Any] = {
        "dims": dims,
        "levels": levels,
        "cells": [None if who else int(s) for s, who in zip(sums.tolist(), withheld_by, strict=True)],
        "total": _sum(totals),
        "withheld_by": withheld_by,
        "noise": [0 if who else d for d, who in zip(noise, withheld_by, strict=True)],
        "total_noise": _total_noise(tables),
        "private": _private(tables),
        "sites": list(tables),
    }
    if edges is not None:
        pooled["edges"] = list(edges)
    return pooled


def _unnamed(
    tables: dict[str, dict[str, Any]], levels: list[list[str]], shape: tuple[int, ...], withheld_by: list[list[str]]
) -> None:
    """A site that counts some of a dim's rows under ``OTHER_LEVEL`` (values too few of its rows hold to be named)
    may hold rows of a level it does not list: each pooled cell of such a level is withheld by it (adding 0 there
    would undercount, and the pooled other is the sites' own others)."""
    for site, table in tables.items():
        for d, site_levels in enumerate(table["levels"]):
            if OTHER_LEVEL not in site_levels:
                continue
            unlisted = np.array([label not in site_levels for label in levels[d]])
            if not unlisted.any():
                continue
            flags = np.zeros(shape, dtype=bool)
            index: list[Any] = [slice(None)] * len(shape)
            index[d] = unlisted
            flags[tuple(index)] = True
            for cell in np.flatnonzero(flags.ravel()).tolist():
                if site not in withheld_by[cell]:
                    withheld_by[cell].append(site)


def _targets(site: str, table: dict[str, Any], levels: list[list[str]], shape: tuple[int, ...]) -> np.ndarray:
    """Where each of a site's cells (C order over its own levels) lands in the pooled table."""
    site_levels = table["levels"]
    if len(site_levels) != len(shape) or len(table["cells"]) != math.prod(len(labels) for labels in site_levels):
        raise PoolingError(f"site {site} sent a count table whose cells do not match its levels; it cannot be pooled")
    if not shape:
        return np.zeros(1, dtype=np.intp)
    where = [{label: i for i, label in enumerate(labels)} for labels in levels]
    axes = [np.array([where[d][label] for label in labels], dtype=np.intp) for d, labels in enumerate(site_levels)]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.ravel_multi_index(tuple(grids), shape).ravel()


def _pool_statistics(tables: dict[str, dict[str, Any]]) -> dict[str, Any]:
    names = list(dict.fromkeys(name for table in tables.values() for name in table.get("columns", {})))
    columns = {
        name: _pool_column({site: t.get("columns", {}).get(name) for site, t in tables.items()}, _noises(tables))
        for name in names
    }
    totals = [table.get("total") for table in tables.values()]
    return {
        "columns": columns,
        "total": _sum(totals),
        "total_noise": _total_noise(tables),
        "private": _private(tables),
        "sites": list(tables),
    }


def _noise(table: dict[str, Any]) -> int | None:
    """The most a site's released counts are off (``noise`` in its table; none from a site before it existed);
    None where the site answered under differential privacy (its noise has no bound: ``private`` says its scale)."""
    if table.get("private"):
        return None
    return int(table.get("noise") or 0)


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a + b


def _total_noise(tables: dict[str, dict[str, Any]]) -> int | None:
    total: int | None = 0
    for table in tables.values():
        total = _plus(total, _noise(table))
    return total


def _private(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The sites that answered under differential privacy, each with its figures (epsilon, the noise's scale)."""
    return {site: dict(table["private"]) for site, table in tables.items() if table.get("private")}


def _noises(tables: dict[str, dict[str, Any]]) -> dict[str, int | None]:
    return {site: _noise(table) for site, table in tables.items()}


def _pool_column(
    parts: dict[str, dict[str, Any] | None], noises: dict[str, int | None] | None = None
) -> dict[str, Any]:
    """One column's statistics over the sites (a site without the column counts as having withheld it);
    ``noises``: the most each site's counts are off."""
    entries = {site: entry or {} for site, entry in parts.items()}
    withheld_by: dict[str, list[str]] = {}
    for field in STAT_FIELDS:
        # a site with no values has no mean, std or sketch to withhold
        who = [s for s, e in entries.items() if e.get(field) is None and (field in ("n", "missing") or e.get("n") != 0)]
        if who:
            withheld_by[field] = who
    ns = [e.get("n") for e in entries.values()]
    missing = [e.get("missing") for e in entries.values()]
    described = [e for e in entries.values() if e.get("n") != 0]  # sites with values (or a withheld n)
    moved: int | None = 0
    for site in entries:
        moved = _plus(moved, (noises or {}).get(site, 0))
    mean, std = _pooled_moments(described)
    sketch = _merged_sketch(described)
    quantiles = _sketch_quantiles(sketch) if sketch is not None else None
    return {
        "n": _sum(ns),
        "missing": _sum(missing),
        "mean": mean,
        "std": std,
        "quantiles": quantiles,
        "sketch": sketch,
        "approximate": (["mean", "std"] if moved != 0 else []) + ["quantiles"],
        "noise": {"n": moved, "missing": moved},
        "withheld_by": withheld_by,
    }


def _pooled_moments(entries: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """The exact mean and sample std of all the sites' values together (Chan et al.'s parallel update)."""
    n, mean, m2 = 0, 0.0, 0.0
    std_known = True
    for entry in entries:
        nb, mb, sb = entry.get("n"), entry.get("mean"), entry.get("std")
        if nb is None or mb is None:
            return None, None
        if sb is None and nb != 1:  # one value has no sample std, and adds nothing to M2
            std_known = False
        m2b = 0.0 if sb is None else float(sb) ** 2 * (int(nb) - 1)
        count = n + int(nb)
        delta = float(mb) - mean
        mean += delta * int(nb) / count
        m2 += m2b + delta * delta * n * int(nb) / count
        n = count
    if n == 0:
        return None, None
    std = math.sqrt(m2 / (n - 1)) if std_known and n >= 2 else None
    return mean, std


def _merged_sketch(entries: list[dict[str, Any]]) -> list[list[Any]] | None:
    """All the sites' centroids together, sorted by their means; None if any site withheld its sketch."""
    centroids: list[list[Any]] = []
    for entry in entries:
        sketch = entry.get("sketch")
        if sketch is None:
            return None
        centroids += [[float(m), float(w)] for m, w in sketch]
    return sorted(centroids, key=lambda c: c[0]) if centroids else None


def _sketch_quantiles(centroids: list[list[Any]]) -> dict[str, float]:
    """Quantiles read off centroids: each one's weight centred at its mean, linear in between."""
    means = np.array([c[0] for c in centroids])
    weights = np.array([c[1] for c in centroids])
    centres = np.cumsum(weights) - weights / 2
    values = np.interp(np.asarray(QUANTILES) * weights.sum(), centres, means)
    return {name: float(v) for name, v in zip(QUANTILE_NAMES, values, strict=True)}


__all__ = ["PoolingError", "level_key", "pool"]
