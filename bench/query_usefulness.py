"""What disclosure control costs a researcher: released and pooled statistics against pandas' truth.

Each site's answer is made by the site's own code (``site_agent.queries.statistics.answer``) through a real ledger
in a folder of its own (``site_agent.queries.ledger``: each count moved by its cell key, by at most
``--noise``), pooled by the coordinator's (``coordinator.pooling.pool``), and compared with pandas over the same
rows:

- **counts**: every released cell of the count tables, crosstabs and histograms a researcher would ask first
  (count by each categorical column, sex by cp, hist of each numeric column in ten bins), at the sites and pooled;
  for cells whose true count is over 100, the largest and the mean absolute error and the largest relative one;
- **means and stds**: pooled over the whole table and over a cohort (age > 50), their relative error;
- **a model standardised with the pooled statistics**: the cohort notebook's features (its five numeric columns)
  standardised with the released pooled means and stds, then with pandas' exact ones; a logistic regression trained
  the same way on each (full batch, fixed seed) on 80% of the pooled rows, its accuracy on the other 20%.

Two tables: the four real UCI heart-disease hospitals (920 rows), and a larger one made from them (each hospital's
rows drawn with replacement to 30 times their number, 27,600 rows: synthetic, to show how the error shrinks with n).

    python -m bench.query_usefulness [--noise 2] [--threshold 10]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import machine
from coordinator.pooling import pool
from flip_core.paths import data_dir
from flip_core.query import QueryKind, QueryRequest
from site_agent.data.formats import read_table
from site_agent.queries.ledger import QueryLedger, Scope
from site_agent.queries.statistics import answer

SITES = {"Cleveland": "cleveland", "Hungary": "hungarian", "Switzerland": "switzerland", "VA": "va"}
CATEGORICAL = ("sex", "cp", "fbs", "restecg", "exang", "slope", "num")
NUMERIC = ("age", "trestbps", "chol", "thalach", "oldpeak")
SCOPE = Scope("bench", "bench", "heart-disease")


def heart() -> dict[str, pd.DataFrame]:
    folder = data_dir() / "heart-disease"
    return {site: read_table(folder / f"processed.{name}.data", "uci-heart") for site, name in SITES.items()}


def larger(tables: dict[str, pd.DataFrame], times: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    return {
        site: table.iloc[rng.integers(0, len(table), len(table) * times)].reset_index(drop=True)
        for site, table in tables.items()
    }


class Federation:
    """The sites' own answering code, each with a ledger of its own, in one process."""

    def __init__(self, tables: dict[str, pd.DataFrame], root: Path, threshold: int, noise: int) -> None:
        self.tables, self.threshold, self.noise = tables, threshold, noise
        self.ledgers = {}
        for site in tables:
            (root / site).mkdir()
            self.ledgers[site] = QueryLedger(root / site)
        self.keys = {site: self.ledgers[site].keys(table) for site, table in tables.items()}

    def ask(self, kind: QueryKind, columns: tuple[str, ...] = (), where: Any = None, edges: tuple = ()) -> dict:
        request = QueryRequest("q", "bench", "bench", "heart-disease", kind, columns, edges=edges)
        released = {}
        for site, table in self.tables.items():
            rows = np.ones(len(table), bool) if where is None else where(table).to_numpy()
            pending = self.ledgers[site].pending(SCOPE, self.keys[site], self.threshold, self.noise)
            released[site] = answer(request, table, rows, self.threshold, pending)
            pending.commit()
        return {"sites": released, "pooled": pool(kind, released)}


def count_errors(federation: Federation, tables: dict[str, pd.DataFrame]) -> tuple[list[float], list[float]]:
    """(site errors, pooled errors) of every released cell whose true count is over 100: released minus truth."""
    whole = pd.concat(tables.values(), ignore_index=True)
    at_sites, pooled = [], []

    def compare(released: dict, truth: dict[str, np.ndarray], pooled_truth: np.ndarray) -> None:
        for site, table in released["sites"].items():
            for got, want in zip(table["cells"], truth[site], strict=True):
                if got is not None and want > 100:
                    at_sites.append(got - want)
        for got, want in zip(released["pooled"]["cells"], pooled_truth, strict=True):
            if got is not None and want > 100:
                pooled.append(got - want)

    for column in CATEGORICAL:
        released = federation.ask(QueryKind.COUNT, (column,))
        levels = released["pooled"]["levels"][0]
        compare(
            released,
            {s: _counts(t[column], released["sites"][s]["levels"][0]) for s, t in tables.items()},
            _counts(whole[column], levels),
        )
    for column in NUMERIC:
        values = whole[column].dropna()
        edges = tuple(float(e) for e in np.linspace(values.min(), values.max(), 11))
        released = federation.ask(QueryKind.HIST, (column,), edges=edges)
        compare(released, {s: _binned(t[column], edges) for s, t in tables.items()}, _binned(whole[column], edges))
    return at_sites, pooled


def _label(value: Any) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _counts(column: pd.Series, levels: list[str]) -> np.ndarray:
    labels = column.map(lambda v: "(missing)" if pd.isna(v) else _label(v))
    found = labels.value_counts()
    return np.array([int(found.get(level, 0)) for level in levels])


def _binned(column: pd.Series, edges: tuple[float, ...]) -> np.ndarray:
    values = column.to_numpy(dtype=float)
    bounds = np.asarray(edges)
    codes = np.searchsorted(bounds, values, side="right")
    codes[values == bounds[-1]] = len(bounds) - 1
    codes[np.isnan(values)] = len(bounds) + 1
    return np.bincount(codes, minlength=len(bounds) + 2)


def moment_errors(federation: Federation, tables: dict[str, pd.DataFrame], where: Any) -> dict[str, tuple]:
    """Per column: (relative error of the pooled mean, of the pooled std) against pandas over the same rows."""
    whole = pd.concat(tables.values(), ignore_index=True)
    rows = whole if where is None else whole[where(whole)]
    released = federation.ask(QueryKind.STATS, NUMERIC, where)["pooled"]["columns"]
    out = {}
    for column in NUMERIC:
        got, values = released[column], rows[column].dropna()
        if got["mean"] is None or got["std"] is None:
            out[column] = (None, None)
            continue
        out[column] = (got["mean"] / values.mean() - 1, got["std"] / values.std(ddof=1) - 1)
    return out


def standardised_accuracy(federation: Federation, tables: dict[str, pd.DataFrame]) -> tuple[float, float, float]:
    """(accuracy with the released pooled statistics, with pandas' exact ones, largest relative gap of the
    statistics) of the same logistic regression on the cohort notebook's features (its five numeric columns
    standardised, then sex; a missing value 0 after standardising; target num > 0)."""
    import torch

    whole = pd.concat(tables.values(), ignore_index=True)
    released = federation.ask(QueryKind.STATS, NUMERIC)["pooled"]["columns"]
    x = whole[list(NUMERIC)].astype("float64")
    y = torch.tensor((whole["num"] > 0).to_numpy(), dtype=torch.float32)
    split = np.random.default_rng(1).permutation(len(whole))
    train, test = split[: int(0.8 * len(split))], split[int(0.8 * len(split)) :]
    gaps = []
    accuracies = []
    exact = (x.mean().to_numpy(), x.std().to_numpy())
    pooled = (np.array([released[c]["mean"] for c in NUMERIC]), np.array([released[c]["std"] for c in NUMERIC]))
    for means, stds in (pooled, exact):
        gaps += [np.abs(means / exact[0] - 1).max(), np.abs(stds / exact[1] - 1).max()]
        standardised = ((x - means) / stds).fillna(0.0).assign(sex=whole["sex"].astype("float64"))
        features = torch.tensor(standardised.to_numpy(), dtype=torch.float32)
        torch.manual_seed(0)
        model = torch.nn.Linear(features.shape[1], 1)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(500):
            optimiser.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(features[train]).squeeze(1), y[train])
            loss.backward()
            optimiser.step()
        with torch.no_grad():
            accuracies.append(float(((model(features[test]).squeeze(1) > 0).float() == y[test]).float().mean()))
    return accuracies[0], accuracies[1], float(max(gaps))


def report(name: str, tables: dict[str, pd.DataFrame], threshold: int, noise: int) -> None:
    rows = sum(len(t) for t in tables.values())
    print(f"\n{name}: {rows} rows at {len(tables)} sites, threshold {threshold}, noise {noise}")
    with tempfile.TemporaryDirectory() as root:
        federation = Federation(tables, Path(root), threshold, noise)
        at_sites, pooled = count_errors(federation, tables)
        for label, errors, bound in (("site", at_sites, noise), ("pooled", pooled, noise * len(tables))):
            errors_ = np.abs(np.array(errors, dtype=float))
            print(
                f"  counts over 100 ({label}, {len(errors)} cells): largest error {errors_.max():.0f}, mean "
                f"{errors_.mean():.2f} (bound ±{bound})"
            )
        for cohort, where in (("whole table", None), ("age > 50", lambda t: t.age > 50)):
            errors = moment_errors(federation, tables, where)
            text = ", ".join(
                f"{c} {'withheld' if m is None else f'{100 * m:+.3f}% / {100 * s:+.3f}%'}"
                for c, (m, s) in errors.items()
            )
            worst = max(abs(v) for pair in errors.values() for v in pair if v is not None)
            print(f"  pooled mean / std vs pandas, {cohort}: {text} (largest {100 * worst:.3f}%)")
        released, exact, gap = standardised_accuracy(federation, tables)
        print(
            f"  logistic regression standardised with the pooled statistics: test accuracy {released:.4f} "
            f"(with pandas' exact ones {exact:.4f}; the statistics differ by at most {100 * gap:.3f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--noise", type=int, default=2)
    parser.add_argument("--threshold", type=int, default=10)
    parser.add_argument("--times", type=int, default=30, help="the larger table: each hospital's rows times this")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    tables = heart()
    report("heart-disease (the four UCI hospitals)", tables, args.threshold, args.noise)
    report(
        f"heart-disease x{args.times} (resampled, synthetic)", larger(tables, args.times), args.threshold, args.noise
    )


if __name__ == "__main__":
    main()
