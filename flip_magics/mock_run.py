"""``%%flip_train --mock``: the cell run in the researcher's own kernel against every site's mock.

Each site makes a synthetic mock of its dataset under its own disclosure rules (``site_agent.mock``:
per-column marginals, no real row); ``FlipClient.mock`` fetches them. A :class:`MockRun` then runs
the cell's rounds here, site by site, as the sites would (the same seeds per step, the dataset's
train fraction, FedAvg weighted by rows), and feeds the same events to the same widget and result
object as a federated run: so a cell that fails on the mock fails here in seconds, before any site
is asked. Every name, title and record says MOCK; its numbers say nothing about the real data.
No IPython here.
"""

from __future__ import annotations

import secrets
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flip_core.cell import cell_line, seed_everything, step_seed
from flip_core.errors import Rejected
from flip_core.status import EventType, MetricPhase, RunStatus, SiteState
from flip_magics.client import FlipClient, RunHandle
from flip_magics.task import PreparedTask, load_weights

GLOBAL = "global"


class MockData:
    """What the cell's functions receive as ``data`` in a mock run: one site's mock, split."""

    def __init__(self, train: pd.DataFrame, test: pd.DataFrame, site: str, dataset: str, round_: int) -> None:
        self.train, self.test, self.site, self.dataset, self.round = train, test, site, dataset, round_
        self.proximal_mu = 0.0

    def proximal_term(self, model: Any) -> Any:
        import torch

        return torch.zeros(())


def mock_split(mock: pd.DataFrame, train_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = np.random.default_rng(seed).permutation(len(mock))
    cut = int(round(train_fraction * len(mock)))
    return mock.iloc[np.sort(order[:cut])].reset_index(drop=True), mock.iloc[np.sort(order[cut:])].reset_index(
        drop=True
    )


def _weighted(parts: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    total = sum(n for _, n in parts) or 1
    names = sorted({k for metrics, _ in parts for k in metrics})
    return {k: sum(m.get(k, 0.0) * n for m, n in parts) / total for k in names}


def _scalars(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must return a dict of metrics, not {type(value).__name__}")
    return {str(k): float(v) for k, v in value.items()}


class MockRun(RunHandle):
    """A run of the cell over the sites' mocks, in this kernel; the same interface as :class:`RunHandle`."""

    def __init__(
        self,
        client: FlipClient,
        task: PreparedTask,
        mocks: dict[str, pd.DataFrame],
        *,
        dataset: str,
        name: str,
        rounds: int,
        seed: int,
        config: dict[str, Any],
        train_fraction: float,
    ) -> None:
        self._mocks, self._seed, self._config, self._fraction = mocks, seed, config, train_fraction
        self._params: dict[str, np.ndarray] = dict(task.initial)
        self._started = time.time()
        view = {
            "run_id": "mock-" + secrets.token_hex(3),
            "name": f"MOCK {name}",
            "rounds": rounds,
            "dataset": dataset,
            "status": RunStatus.SUBMITTED,
            "sites": sorted(mocks),
        }
        super().__init__(client, view, task)  # its thread runs _follow: the rounds, here

    @property
    def record(self) -> dict[str, Any]:
        assert self._task is not None
        return {
            "mock": True,
            "name": self.name,
            "dataset": self.dataset,
            "rounds": self.rounds,
            "seed": self._seed,
            "source_hash": self._task.source_hash,
            "sites": sorted(self._mocks),
            "mock_rows": {site: len(frame) for site, frame in self._mocks.items()},
            "status": self.status,
            "reason": self.reason,
            "created": self._started,
        }

    @property
    def model(self) -> Any:
        self.wait()
        assert self._task is not None
        if self._model is None:
            self._model = load_weights(self._task, self._params)
        return self._model

    def save(self, directory: str | Path, example: Any = None) -> Path:
        raise Rejected(f"run {self.run_id} is a mock: its model learned synthetic data, so it is not exported")

    def __repr__(self) -> str:
        return f"<FLIP MOCK run {self.run_id} {self.name!r}: {self.status}, round {self.round}/{self.rounds}>"

    # -- the rounds ---------------------------------------------------------------------
    def _follow(self) -> None:
        sites = sorted(self._mocks)
        self._apply({"type": EventType.RUN, "status": RunStatus.RUNNING, "sites": sites})
        site = ""
        try:
            evals = []
            for site in sites:
                metrics, n = self._evaluate(site, 0, self._params)
                evals.append((metrics, n))
                self._apply(_metrics(0, site, MetricPhase.EVALUATE, metrics, n))
            self._apply(_metrics(0, GLOBAL, MetricPhase.EVALUATE, _weighted(evals), sum(n for _, n in evals)))
            for round_ in range(1, self.rounds + 1):
                self._round(round_, sites)
            for site in sites:
                metrics, n = self._evaluate(site, self.rounds + 1, self._params)
                self._apply(_metrics(self.rounds, site, MetricPhase.EVALUATE, metrics, n))
        except Exception as exc:  # noqa: BLE001 - the researcher's cell: its failure is the run's result
            traceback.print_exc()
            where = f"{type(exc).__name__} at cell line {cell_line(exc)} on the MOCK of {site}"
            self._apply({"type": EventType.SITE, "site": site, "status": SiteState.FAILED, "round": self.round})
            self._apply({"type": EventType.RUN, "status": RunStatus.FAILED, "reason": f"MOCK run failed: {where}"})
            return
        self._apply({"type": EventType.RUN, "status": RunStatus.COMPLETED})

    def _round(self, round_: int, sites: list[str]) -> None:
        started = time.monotonic()
        updates, trains = [], []
        for site in sites:
            self._apply({"type": EventType.SITE, "site": site, "status": SiteState.TRAINING, "round": round_})
            params, metrics, n = self._train(site, round_)
            updates.append((params, n))
            trains.append((metrics, n))
            self._apply(_metrics(round_, site, MetricPhase.TRAIN, metrics, n))
            self._apply({"type": EventType.SITE, "site": site, "status": SiteState.DONE, "round": round_, "samples": n})
        total = sum(n for _, n in updates) or 1
        self._params = {  # FedAvg: weighted by each site's rows
            k: np.sum([p[k].astype(np.float64) * (n / total) for p, n in updates], axis=0).astype(v.dtype)
            for k, v in self._params.items()
        }
        self._apply(_metrics(round_, GLOBAL, MetricPhase.TRAIN, _weighted(trains), total))
        seconds = time.monotonic() - started
        self._apply({"type": EventType.ROUND, "round": round_, "sites": len(sites), "seconds": seconds})

    def _data(self, site: str, round_: int) -> MockData:
        train, test = mock_split(self._mocks[site], self._fraction, self._seed)
        return MockData(train, test, site, self.dataset, round_)

    def _model_at(self, params: dict[str, np.ndarray]) -> Any:
        assert self._task is not None
        return load_weights(self._task, params)

    def _evaluate(self, site: str, round_: int, params: dict[str, np.ndarray]) -> tuple[dict[str, float], int]:
        assert self._task is not None
        data = self._data(site, round_)
        seed_everything(step_seed(self._seed, round_, site))
        metrics = self._task.namespace["evaluate"](self._model_at(params), data, dict(self._config))
        return _scalars(metrics, "evaluate()"), len(data.test)

    def _train(self, site: str, round_: int) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
        assert self._task is not None
        data = self._data(site, round_)
        seed_everything(step_seed(self._seed, round_, site))
        model = self._model_at(self._params)
        metrics = _scalars(self._task.namespace["train"](model, data, dict(self._config)), "train()")
        n = int(metrics.pop("num_examples", len(data.train)))
        params = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        return params, metrics, max(1, min(n, len(data.train)))


def _metrics(round_: int, site: str, phase: str, metrics: dict[str, float], samples: int) -> dict[str, Any]:
    return {
        "type": EventType.METRICS,
        "round": round_,
        "site": site,
        "phase": phase,
        "metrics": metrics,
        "samples": samples,
    }
