"""``%%flip_train --mock``: the cell run in the researcher's own kernel against every site's mock.

Each site makes a synthetic mock of its dataset under its own disclosure rules (``site_agent.queries.mock``:
per-column marginals, no real row); ``FlipClient.mock`` fetches them. A :class:`MockRun` then runs
the cell's rounds here, site by site, as the sites would (the same seeds per step, the dataset's
train fraction, the run's strategy with its options and FedProx's proximal term, each update weighted
by its rows), aggregates and weighs metrics with the hub's own functions (``flip_core.aggregation``),
and feeds the same events to the same widget and result object as a federated run: so a cell that
fails on the mock fails here in seconds, before any site is asked. As at a site, only the metric names the task
declares leave a step (the others are dropped, and the site's row says so). Every name, title and record says
MOCK; its numbers say nothing about the real data. A site's mock is a table, or for an imaging dataset the cases
as a cell reads them, their synthetic image files written here (``flip_magics.mock_images``); ``data.cached`` and
``data.device`` are there as at a site (the device is this kernel's CPU). No IPython here.
"""

from __future__ import annotations

import linecache
import secrets
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flip_core.aggregation import Strategy, Update, weighted_metrics
from flip_core.cell import CELL_FILENAME, cell_line, failed_step, proximal_term, seed_everything, step_seed
from flip_core.errors import Rejected
from flip_core.runs import RunRecord
from flip_core.status import EventType, MetricPhase, RunStatus, SiteState
from flip_core.vocabulary import WEIGHT_KEY, undeclared
from flip_magics.connection import Connection
from flip_magics.run_handle import RunHandle
from flip_magics.task import PreparedTask, load_weights

GLOBAL = "global"
DEVICE = "cpu"  # where a mock run's steps run: this kernel's CPU, told as a site tells its device
Metrics = list[tuple[dict[str, float], int]]  # each site's metrics and the rows they were measured on
Part = pd.DataFrame | list[dict[str, Any]]  # a mock's rows, or an imaging mock's cases
Cache = Callable[[str, str, Any], Any]  # (site, part, transform) -> the part's MONAI dataset


class MockData:
    """What the cell's functions receive as ``data`` in a mock run: one site's mock, split, and the round's
    global parameters (for FedProx's :meth:`proximal_term`, as at a site)."""

    def __init__(
        self,
        train: Part,
        test: Part,
        site: str,
        dataset: str,
        round_: int,
        *,
        global_params: dict[str, np.ndarray],
        proximal_mu: float,
        cache: Cache | None = None,
    ) -> None:
        self.train, self.test, self.site, self.dataset, self.round = train, test, site, dataset, round_
        self.device = DEVICE
        self._global = global_params
        self._cache = cache
        self.proximal_mu = proximal_mu

    def cached(self, part: str, transform: Any = None) -> Any:
        """The MONAI dataset of this mock's ``"train"`` or ``"test"`` cases under ``transform``, decoded once per
        mock run (a ``monai.data.CacheDataset``), as ``data.cached`` is at a site."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', not {part!r}")
        if self._cache is None or not isinstance(self.train, list):
            raise RuntimeError("this data has no cache (a table's rows need none)")
        return self._cache(self.site, part, transform)

    def proximal_term(self, model: Any) -> Any:
        """FedProx's ``mu/2 * ||w - w_global||^2`` for ``model`` (0 unless the run uses fedprox)."""
        return proximal_term(model, self._global, self.proximal_mu)


def mock_split(mock: Part, train_fraction: float, seed: int) -> tuple[Part, Part]:
    """A mock's rows (or cases) cut into a train and a test part, by the run's seed."""
    order = np.random.default_rng(seed).permutation(len(mock))
    cut = int(round(train_fraction * len(mock)))
    train, test = np.sort(order[:cut]), np.sort(order[cut:])
    if isinstance(mock, list):
        return [dict(mock[i]) for i in train], [dict(mock[i]) for i in test]
    return mock.iloc[train].reset_index(drop=True), mock.iloc[test].reset_index(drop=True)


class MockCache:
    """The MONAI datasets of a mock run's imaging cases, one per site and part, kept while the transform it was
    made with is the one asked for (as a site's warm task process keeps them across a run's rounds)."""

    def __init__(self, parts: Callable[[str], tuple[Part, Part]]) -> None:
        self._parts = parts
        self._held: dict[tuple[str, str], tuple[Any, Any]] = {}

    def __call__(self, site: str, part: str, transform: Any) -> Any:
        held = self._held.get((site, part))
        if held is None or held[0] is not transform:
            from monai.data.dataset import CacheDataset

            train, test = self._parts(site)
            cases = [dict(c) for c in (train if part == "train" else test) if isinstance(c, dict)]
            dataset = CacheDataset(data=cases, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
            held = self._held[(site, part)] = (transform, dataset)
        return held[1]


def _scalars(value: Any, where: str) -> dict[str, float]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must return a dict of metrics, not {type(value).__name__}")
    return {str(k): float(v) for k, v in value.items()}


class MockRun(RunHandle):
    """A run of the cell over the sites' mocks, in this kernel; the same interface as :class:`RunHandle`.

    ``strategy`` aggregates the sites' updates, as the hub's would (``flip_core.aggregation.strategy_for``);
    the cell's ``config`` is the run's with what the strategy tells the sites (FedProx's ``proximal_mu``)."""

    def __init__(
        self,
        connection: Connection,
        task: PreparedTask,
        mocks: dict[str, Part],
        *,
        dataset: str,
        name: str,
        rounds: int,
        seed: int,
        config: dict[str, Any],
        strategy: Strategy,
        train_fraction: float,
        metrics: tuple[str, ...] | None = None,
    ) -> None:
        """``metrics``: the names the task declares (None: any)."""
        self._mocks, self._seed, self._fraction = mocks, seed, train_fraction
        self._declared = metrics
        self._withheld: dict[str, set[str]] = {}  # each site's kinds of metrics withheld, said in its next row
        self.strategy = strategy
        self._config = {**config, **strategy.client_config(), "device": DEVICE}  # as a site hands it to the cell
        self._cache = MockCache(self._split)
        self.traceback = ""  # the cell's traceback where the mock run failed
        self._params: dict[str, np.ndarray] = dict(task.initial)
        self._step = ("", "")  # the site and the function of the cell being run, for the sentence if it fails
        self._started = time.time()
        view = {
            "run_id": "mock-" + secrets.token_hex(3),
            "name": f"MOCK {name}",
            "rounds": rounds,
            "dataset": dataset,
            "status": RunStatus.SUBMITTED,
            "sites": sorted(mocks),
        }
        super().__init__(connection, view, task)  # its thread runs _follow: the rounds, here

    @property
    def record(self) -> RunRecord:
        """The mock run's record: what ran over which sites' mocks (``mock`` true), never a hub's."""
        assert self._task is not None
        return RunRecord(
            run_id=self.run_id,
            mock=True,
            name=self.name,
            dataset=self.dataset,
            rounds=self.rounds,
            seed=self._seed,
            source_hash=self._task.source_hash,
            sites=sorted(self._mocks),
            mock_rows={site: len(frame) for site, frame in self._mocks.items()},
            status=self.status,
            reason=self.reason,
            created=self._started,
        )

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
        try:
            evals = []
            for site in sites:
                metrics, n = self._evaluate(site, 0, self._params)
                evals.append((metrics, n))
                self._apply(_metrics(0, site, MetricPhase.EVALUATE, metrics, n))
            self._global(0, MetricPhase.EVALUATE, evals)
            for round_ in range(1, self.rounds + 1):
                self._round(round_, sites)
            for site in sites:
                metrics, n = self._evaluate(site, self.rounds + 1, self._params)
                self._apply(_metrics(self.rounds, site, MetricPhase.EVALUATE, metrics, n))
        except Exception as exc:  # noqa: BLE001 - the researcher's cell: its failure is the run's result
            self.traceback = cell_traceback(exc, self._task.source if self._task else "")
            print(self.traceback, file=sys.stderr, end="")
            site, function = self._step
            failed = failed_step(type(exc).__name__, cell_line(exc), f"{function} on the MOCK of {site}")
            self._apply({"type": EventType.SITE, "site": site, "status": SiteState.FAILED, "round": self.round})
            self._apply({"type": EventType.RUN, "status": RunStatus.FAILED, "reason": f"MOCK run failed: {failed}"})
            return
        self._apply({"type": EventType.RUN, "status": RunStatus.COMPLETED})

    def _round(self, round_: int, sites: list[str]) -> None:
        started = time.monotonic()
        updates: list[Update] = []
        trains: Metrics = []
        for site in sites:
            self._apply({"type": EventType.SITE, "site": site, "status": SiteState.TRAINING, "round": round_})
            params, metrics, n = self._train(site, round_)
            updates.append((params, n))
            trains.append((metrics, n))
            self._apply(_metrics(round_, site, MetricPhase.TRAIN, metrics, n))
            done = {"type": EventType.SITE, "site": site, "status": SiteState.DONE, "round": round_, "samples": n}
            if kinds := self._withheld.pop(site, set()):
                done["detail"] = "; ".join(undeclared(kind) for kind in sorted(kinds, reverse=True))
            self._apply(done)
        self._params = self.strategy.aggregate(self._params, updates)  # in the sites' order, as the hub folds them
        self._global(round_, MetricPhase.TRAIN, trains)
        seconds = time.monotonic() - started
        self._apply({"type": EventType.ROUND, "round": round_, "sites": len(sites), "seconds": seconds})

    def _global(self, round_: int, phase: MetricPhase, parts: Metrics) -> None:
        """The round's global metrics, as the hub weighs them: each over the sites that reported it."""
        if reported := [(metrics, n) for metrics, n in parts if metrics]:
            samples = sum(n for _, n in reported)
            self._apply(_metrics(round_, GLOBAL, phase, weighted_metrics(reported), samples))

    def _split(self, site: str) -> tuple[Part, Part]:
        return mock_split(self._mocks[site], self._fraction, self._seed)

    def _data(self, site: str, round_: int, params: dict[str, np.ndarray]) -> MockData:
        train, test = self._split(site)
        mu = float(self._config.get("proximal_mu", 0.0))
        return MockData(
            train, test, site, self.dataset, round_, global_params=params, proximal_mu=mu, cache=self._cache
        )

    def _cell(self, function: str, data: MockData, params: dict[str, np.ndarray]) -> tuple[Any, dict[str, float]]:
        """The cell's ``function`` on ``data``'s site, seeded as that site's step is (before its model is built
        holding ``params``): the model after it and its metrics as numbers."""
        assert self._task is not None
        self._step = (data.site, "build_model()")
        seed_everything(step_seed(self._seed, data.round, data.site))
        model = load_weights(self._task, params)
        self._step = (data.site, f"{function}()")
        metrics = _scalars(self._task.namespace[function](model, data, dict(self._config)), f"{function}()")
        if self._declared is not None and (dropped := set(metrics) - set(self._declared) - {WEIGHT_KEY}):
            self._withheld.setdefault(data.site, set()).add("train" if function == "train" else "eval")
            metrics = {k: v for k, v in metrics.items() if k not in dropped}
        return model, metrics

    def _evaluate(self, site: str, round_: int, params: dict[str, np.ndarray]) -> tuple[dict[str, float], int]:
        data = self._data(site, round_, params)
        return self._cell("evaluate", data, params)[1], len(data.test)

    def _train(self, site: str, round_: int) -> tuple[dict[str, np.ndarray], dict[str, float], int]:
        data = self._data(site, round_, self._params)
        model, metrics = self._cell("train", data, self._params)
        # the cell may weight its update by fewer examples than its split holds, never by more or by none
        reported, rows = int(metrics.pop("num_examples", len(data.train))), len(data.train)
        params = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
        return params, metrics, reported if 1 <= reported <= rows else rows


_lines_lock = threading.Lock()


def cell_traceback(exc: BaseException, source: str) -> str:
    """``exc``'s traceback as text from the cell's first frame on, the cell's own lines shown (``source``, compiled
    under ``flip_core.cell.CELL_FILENAME``, which no file holds)."""
    with _lines_lock:
        before = linecache.cache.get(CELL_FILENAME)
        lines = source.splitlines(keepends=True)
        linecache.cache[CELL_FILENAME] = (len(source), None, lines, CELL_FILENAME)
        try:
            summary = traceback.TracebackException.from_exception(exc)
        finally:
            if before is None:
                linecache.cache.pop(CELL_FILENAME, None)
            else:
                linecache.cache[CELL_FILENAME] = before
    frames = list(summary.stack)
    first = next((i for i, frame in enumerate(frames) if frame.filename == CELL_FILENAME), 0)
    summary.stack = traceback.StackSummary.from_list(frames[first:])
    return "".join(summary.format())


def _metrics(round_: int, site: str, phase: str, metrics: dict[str, float], samples: int) -> dict[str, Any]:
    return {
        "type": EventType.METRICS,
        "round": round_,
        "site": site,
        "phase": phase,
        "metrics": metrics,
        "samples": samples,
    }
