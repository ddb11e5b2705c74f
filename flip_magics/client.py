"""The plain client API behind the magics: connect, list sites, query, train, follow, attach, stop.

No IPython here. It asks the coordinator through a :class:`flip_magics.connection.Connection`. A
:class:`RunHandle` follows its run's event stream (server-sent events) in a background thread,
reconnecting by itself, and keeps the run's state: per-site status, metric history, final model;
a :class:`flip_magics.mock_run.MockRun` runs the cell here instead, on the sites' mocks.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import requests

from flip_core.aggregation import make_strategy, strategy_for
from flip_core.api import CohortSpec, QuerySpec, ReleaseSpec, TaskSpec, parse
from flip_core.codec import pack_arrays
from flip_core.errors import FlipError, NotConnected, Rejected, RequestInvalid
from flip_core.filters import parse as parse_filter
from flip_core.models import GlmSpec, SurvivalSpec
from flip_core.paths import read_connection
from flip_core.runs import record_of
from flip_magics.airlock import AirlockRequest, ReleasedItem, released_item
from flip_magics.connection import Connection
from flip_magics.explain import Explanation, explain, not_replayed, replay, site_failure
from flip_magics.mock_images import mock_cases
from flip_magics.mock_run import DEVICE, MockRun, Part
from flip_magics.models import ModelResult, model_from
from flip_magics.provenance import log_run, task_provenance
from flip_magics.queries import QueryResult, result_from
from flip_magics.run_handle import TERMINAL, RunHandle
from flip_magics.site_tables import inclusion_table, site_table
from flip_magics.survival import SurvivalResult, survival_from
from flip_magics.task import metrics_to_declare, prepare

log = logging.getLogger(__name__)

ENV_API_URL = "FLIP_API_URL"  # the coordinator's researcher API: the hub sets it for every user's server
ENV_HUB_TOKEN = "JUPYTERHUB_API_TOKEN"  # the user's own hub token, in every kernel of their server
ENV_API_TOKEN = "FLIP_API_TOKEN"  # a headless token (`flip token add`), for scripts and `flip run --url`
ENV_PROJECT = "FLIP_PROJECT"


class FlipClient:
    """A researcher's connection to a FLIP coordinator."""

    def __init__(self, url: str, token: str, *, project: str | None = None, timeout: float = 30.0) -> None:
        """``project``: the FLIP project to act in (a hub user in several); by default the caller's only one."""
        self.connection = Connection(url, token, project=project, timeout=timeout)

    @property
    def url(self) -> str:
        """The coordinator's URL (no trailing slash)."""
        return self.connection.url

    @property
    def token(self) -> str:
        """The token this client acts with (a hub token or a headless one)."""
        return self.connection.token

    @property
    def project(self) -> str | None:
        """The FLIP project this client acts in (None: the caller's only one)."""
        return self.connection.project

    @property
    def session(self) -> requests.Session:
        """The authenticated HTTP session (its headers carry the token and the project)."""
        return self.connection.session

    @classmethod
    def from_environment(cls, project: str | None = None) -> FlipClient:
        """On a JupyterHub: the hub's coordinator with this user's hub token; with ``$FLIP_API_URL`` and a
        headless ``$FLIP_API_TOKEN`` (``flip run --url``): that coordinator. Elsewhere: the local federation's
        connection file (``flip up``)."""
        project = project or os.environ.get(ENV_PROJECT) or None
        url, token = os.environ.get(ENV_API_URL), os.environ.get(ENV_HUB_TOKEN) or os.environ.get(ENV_API_TOKEN)
        if url and token:
            return cls(url, token, project=project)
        connection = read_connection()
        if connection is None:
            raise NotConnected(
                "no FLIP coordinator found: on a FLIP hub the server sets $FLIP_API_URL; locally run "
                "`flip up`; or give %flip_connect URL --token T"
            )
        return cls(connection["coordinator_url"], connection["token"], project=project)

    def whoami(self) -> dict[str, str]:
        return self.connection.call("GET", "/api/whoami").json()  # type: ignore[no-any-return]

    def sites(self) -> list[dict[str, Any]]:
        return self.connection.call("GET", "/api/sites").json()  # type: ignore[no-any-return]

    def site_table(self) -> pd.DataFrame:
        """One row per site and dataset: its status, whether a task process is ready, its device, the rows."""
        return site_table(self.sites())

    def inclusion(self) -> pd.DataFrame:
        """Each imaging dataset's inclusion report at each site (:func:`flip_magics.site_tables.inclusion_table`)."""
        return inclusion_table(self.sites())

    def runs(self) -> list[dict[str, Any]]:
        return self.connection.call("GET", "/api/runs").json()  # type: ignore[no-any-return]

    def run(self, run_id: str) -> dict[str, Any]:
        return self.connection.run(run_id)

    def stop(self, run_id: str) -> dict[str, Any]:
        return self.connection.call("POST", f"/api/runs/{run_id}/stop").json()  # type: ignore[no-any-return]

    # -- queries --------------------------------------------------------------------
    def query(
        self,
        dataset: str,
        kind: str = "count",
        columns: list[str] | tuple[str, ...] = (),
        where: str = "",
        *,
        bins: int = 10,
        range: tuple[float, float] | None = None,  # noqa: A002 - the option's own name (--range)
        sites: list[str] | None = None,
        threshold: int | None = None,
        text: str = "",
        cohort: str | None = None,
    ) -> QueryResult:
        """One federated statistic (``count``, ``stats``, ``hist``, ``crosstab``, ``missing``; ``top`` of an OMOP
        database's concept domain, ``bins`` concepts) over the rows of ``dataset`` that match ``where``, at every
        online site holding it (or ``sites``): each site's released table and the pooled one. ``cohort``: within
        that frozen cohort (an OMOP cohort's persons also have ``age``, ``age_group`` and ``index_year`` at their
        index date). What each site releases is its own policy's to decide."""
        spec: QuerySpec = parse(
            QuerySpec,
            {
                "dataset": dataset,
                "kind": kind,
                "columns": list(columns),
                "where": where,
                "bins": bins,
                "range": None if range is None else (float(range[0]), float(range[1])),
                "sites": sites,
                "threshold": threshold,
                "text": text,
                "cohort": cohort,
            },
            "the query",
        )
        parse_filter(where)  # a malformed filter: told here, before anything is sent
        answer = self.connection.call("POST", "/api/queries", json=spec.model_dump(mode="json"), timeout=120).json()
        return result_from(answer)

    def cohort(
        self,
        name: str,
        dataset: str,
        where: str = "",
        *,
        sites: list[str] | None = None,
        circe: dict[str, Any] | str | None = None,
    ) -> QueryResult:
        """Freeze, at each site holding ``dataset``, the rows matching ``where`` as cohort ``name`` of this
        project, for ``train(..., cohort=name)``: each site's count (withheld where small) and the cohort's
        hash there. Made again with the same definition, it is the same cohort. ``circe``: for an OMOP database,
        an OHDSI Circe cohort definition instead of a filter (ATLAS's JSON export, as a dict or its text); each site
        renders it to its own SQL, and no SQL is ever sent."""
        definition = json.loads(circe) if isinstance(circe, str) else circe
        spec: CohortSpec = parse(
            CohortSpec,
            {"name": name, "dataset": dataset, "where": where, "sites": sites, "circe": definition},
            "the cohort",
        )
        parse_filter(where)
        answer = self.connection.call("POST", "/api/cohorts", json=spec.model_dump(mode="json"), timeout=120).json()
        return result_from(answer)

    def glm(
        self,
        formula: str,
        dataset: str,
        family: str = "gaussian",
        *,
        where: str = "",
        cohort: str | None = None,
        sites: list[str] | None = None,
        threshold: int | None = None,
        text: str = "",
        covariates: dict[str, Any] | str | None = None,
    ) -> ModelResult:
        """A generalised linear model (``gaussian``, ``binomial``: logistic, ``poisson``) of ``formula`` (``OUTCOME ~
        TERM + C(COLUMN) ...``, parsed, never evaluated) over the rows of ``dataset`` that match ``where`` (or
        within ``cohort``), fitted exactly across the sites from their summed statistics: statsmodels' coefficients,
        standard errors, p-values and intervals, each site's rows. A site that refuses is named with its sentence.
        ``covariates``: within an OMOP cohort, columns declared as for training (built at each person's index date)."""
        body = {"dataset": dataset, "formula": formula, "family": family, "where": where, "cohort": cohort,
                "sites": sites, "threshold": threshold, "text": text, "covariates": _declared(covariates)}  # fmt: skip
        spec: GlmSpec = parse(GlmSpec, body, "the model")
        parse_filter(where)
        answer = self.connection.call("POST", "/api/glm", json=spec.model_dump(mode="json"), timeout=300).json()
        return model_from(answer)

    def km(self, dataset: str, time: str, event: str, edges: list[float], *, group: str | None = None, where: str = "",
           cohort: str | None = None, sites: list[str] | None = None, threshold: int | None = None,
           text: str = "", covariates: dict[str, Any] | str | None = None) -> SurvivalResult:  # fmt: skip
        """Kaplan-Meier curves of ``time`` until ``event`` (a 0/1 column), one per level of ``group`` (or one), at the
        bin ``edges`` (each site merges its small bins; no exact time leaves it): the curves with their 95% bands and
        the numbers at risk, the log-rank test across the groups, each site's rows and merges."""
        return survival_from(self._survival({"kind": "km", "dataset": dataset, "time": time, "event": event,
            "edges": list(edges), "group": group, "where": where, "cohort": cohort, "sites": sites,
            "threshold": threshold, "text": text, "covariates": _declared(covariates)}))  # fmt: skip

    def cox(self, terms: str, dataset: str, time: str, event: str, *, binned: bool = False,
            edges: list[float] | None = None, where: str = "", cohort: str | None = None,
            sites: list[str] | None = None, threshold: int | None = None, text: str = "",
            covariates: dict[str, Any] | str | None = None) -> ModelResult:  # fmt: skip
        """A Cox proportional-hazards model of ``terms`` (``age + sex + C(arm)``, parsed, never evaluated) for ``time``
        until ``event``: stratified by site over the exact times, or (``binned``) with one baseline hazard over the
        times binned at ``edges``, with the proportional-hazards check. Hazard ratios with their intervals."""
        return model_from(self._survival({"kind": "cox", "dataset": dataset, "time": time, "event": event,
            "terms": terms, "binned": binned, "edges": list(edges or []), "where": where, "cohort": cohort,
            "sites": sites, "threshold": threshold, "text": text, "covariates": _declared(covariates)}))  # fmt: skip

    def _survival(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/survival`` with ``body``, checked here first (a wrong part is told before anything is sent)."""
        spec: SurvivalSpec = parse(SurvivalSpec, body, "the analysis")
        parse_filter(spec.where)
        answer: dict[str, Any] = self.connection.call(
            "POST", "/api/survival", json=spec.model_dump(mode="json"), timeout=300
        ).json()
        return answer

    # -- the airlock ----------------------------------------------------------------
    def request_release(
        self,
        item: str,
        site: str,
        purpose: str,
        *,
        run: str = "",
        query: dict[str, Any] | None = None,
    ) -> AirlockRequest:
        """Ask ``site`` to release one item its rules hold back: ``"traceback"`` (the full traceback of ``run``'s
        failed step there) or ``"query"`` (its exact answer to ``query``, a dict of :meth:`query`'s arguments:
        ``dataset``, ``kind``, ``columns``, ``where``, ``range``, ...). ``purpose``: in a sentence, what it is for.
        A person at the site reviews it; :meth:`requests` tells its state, :meth:`released` fetches it."""
        body: dict[str, Any] = {"site": site, "item": item, "purpose": purpose, "run": run}
        if query is not None:
            body["query"] = {**query, "columns": list(query.get("columns", ()))}
        spec: ReleaseSpec = parse(ReleaseSpec, body, "the request")
        if spec.query is not None:
            parse_filter(spec.query.where)
        view = self.connection.call("POST", "/api/airlock", json=spec.model_dump(mode="json"), timeout=120).json()
        return AirlockRequest.from_view(view)

    def requests(self) -> list[AirlockRequest]:
        """This researcher's airlock requests in this project, newest first, each with its state as its site tells
        it now (a site offline: "unknown")."""
        views = self.connection.call("GET", "/api/airlock", timeout=120).json()
        return [AirlockRequest.from_view(v) for v in views]

    def released(self, request_id: str) -> ReleasedItem:
        """A released item, fetched from its site through the hub, its site's signature and hash checked; its
        ``value`` is the traceback as text or the query result as a DataFrame."""
        view = self.connection.call("GET", f"/api/airlock/{request_id}", timeout=120).json()
        return released_item(view)

    def datasets(self) -> pd.DataFrame:
        """Every dataset's schema and size at every online site holding it: one row per site and column, with
        its type, the dataset's rows and the column's missing values (withheld, <NA>, where small; a count of a
        ``missing`` query, so moved by at most the site's noise where its counts move)."""
        rows: list[dict[str, Any]] = []
        sites = [s for s in self.sites() if s["status"] == "online"]
        for dataset in sorted({d["name"] for s in sites for d in s["datasets"]}):
            missing = self.query(dataset, "missing", text=f"{dataset} missing (the catalog)")
            counted = {(r.site, r.column, r.state): r["count"] for _, r in missing.sites.iterrows()}
            for site in sites:
                entry = next((d for d in site["datasets"] if d["name"] == dataset), None)
                if entry is None:
                    continue
                for column, dtype in zip(entry["columns"], entry["dtypes"], strict=False):
                    rows.append(
                        {
                            "site": site["site"],
                            "dataset": dataset,
                            "rows": entry.get("rows"),
                            "column": column,
                            "dtype": dtype,
                            "missing": counted.get((site["site"], column, "missing"), pd.NA),
                        }
                    )
        frame = pd.DataFrame(rows, columns=["site", "dataset", "rows", "column", "dtype", "missing"])
        for name in ("rows", "missing"):
            frame[name] = pd.array(frame[name].tolist(), dtype="Int64")
        return frame

    def mock(self, dataset: str, *, sites: list[str] | None = None) -> Mocks:
        """Each site's synthetic mock of ``dataset`` (made there under its disclosure rules: per-column
        marginals, no real row), as DataFrames by site. For developing a cell, never for results."""
        spec: QuerySpec = parse(QuerySpec, {"dataset": dataset, "kind": "mock", "sites": sites}, "the query")
        answer = self.connection.call("POST", "/api/queries", json=spec.model_dump(mode="json"), timeout=120).json()
        mocks = Mocks(dataset, answer.get("refused", {}))
        for site, reply in answer["sites"].items():
            table = reply["table"]
            if table.get("images"):
                mocks.images[site] = table["images"]
            frame = pd.DataFrame(table["rows"], columns=table["columns"])
            for column, dtype in zip(table["columns"], table["dtypes"], strict=True):
                try:
                    frame[column] = frame[column].astype(dtype)
                except (TypeError, ValueError):
                    pass  # a whole-number column with missing values stays float
            mocks[site] = frame
        if not mocks:
            raise Rejected(
                f"no site sent a mock of {dataset!r}: " + "; ".join(f"{s}: {w}" for s, w in mocks.refused.items())
            )
        return mocks

    # -- training -------------------------------------------------------------------
    def train(
        self,
        source: str,
        *,
        dataset: str,
        rounds: int = 1,
        strategy: str = "fedavg",
        min_sites: int | None = None,
        seed: int = 0,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        round_timeout: float | None = None,
        dp_epsilon: float | None = None,
        dp_clip: float | None = None,
        cohort: str | None = None,
        mock: bool = False,
        metrics: list[str] | None = None,
        covariates: dict[str, Any] | str | None = None,
    ) -> RunHandle:
        """Check the cell locally, submit it, and return a handle that follows the run.

        ``dp_epsilon``: the run is differentially private at every site, spending at most this epsilon
        of the project's budget there (each site adds the noise itself, clipping updates to ``dp_clip``).
        ``cohort``: train on the rows that cohort froze at each site (:meth:`cohort`), not the whole table.
        ``mock``: run the cell here, in this kernel, against every site's mock (:meth:`mock`), nothing submitted.
        ``metrics``: the metric names train() and evaluate() return; by default those read from the dict literals
        they return. No other name leaves a site (a site says when it withheld some).
        ``covariates``: on an OMOP dataset, the per-person table the cell's ``data.train`` and ``data.test`` are, as a
        covariate specification (``flip_core.covariates``; a dict or its JSON text): each site builds it in its own
        database, and the specification is part of the code hash its admin approves."""
        covariates = _declared(covariates)
        spec: TaskSpec = parse(
            TaskSpec,
            {
                "source": source,
                "dataset": dataset,
                "rounds": rounds,
                "strategy": strategy,
                "min_sites": min_sites,
                "seed": seed,
                "name": name or "run",
                "config": config or {},
                "round_timeout": round_timeout,
                "dp_epsilon": dp_epsilon,
                "dp_clip": dp_clip,
                "cohort": cohort,
                "metrics": None if metrics is None else list(metrics),
                "covariates": covariates,
            },
            "the task",
        )  # a wrong option: told here, before anything is sent
        if mock and spec.covariates is not None:
            raise RequestInvalid("a dry run over the sites' mocks takes no --covariates: the mocks are of the persons")
        if mock:
            return self._mock_run(spec)
        body = spec.model_dump(mode="json")
        self.connection.call("POST", "/api/runs/check", json=body)  # a wrong dataset: before local work
        task = prepare(source, seed=seed)
        declared = metrics_to_declare(task, spec.metrics)
        sha = self.connection.call(
            "POST", "/api/models", data=pack_arrays(task.initial), headers={"Content-Type": "application/octet-stream"}
        ).json()["sha256"]
        more = {"initial_model": sha, "metrics": declared, **task_provenance()}
        spec = parse(TaskSpec, {**spec.model_dump(mode="json"), **more}, "the task")
        view = self.connection.call("POST", "/api/runs", json=spec.model_dump(mode="json")).json()
        log_run(view["run_id"])
        return RunHandle(self.connection, view, task)

    def _mock_run(self, spec: TaskSpec) -> RunHandle:
        """The cell run here on every site's mock, with the strategy the hub would use (built first: a wrong
        strategy or option is told before anything else)."""
        strategy = strategy_for(spec.strategy, spec.config)
        task = prepare(spec.source, seed=spec.seed)
        declared = metrics_to_declare(task, spec.metrics)  # the hub's rule, here too
        holders = [d for s in self.sites() for d in s["datasets"] if d["name"] == spec.dataset]
        fractions = [d["train_rows"] / d["rows"] for d in holders if d.get("rows") and d.get("train_rows")]
        return MockRun(
            self.connection,
            task,
            self._mock_parts(spec.dataset),
            dataset=spec.dataset,
            name=spec.name or "run",
            rounds=spec.rounds,
            seed=spec.seed,
            config={**spec.config},
            strategy=strategy,
            train_fraction=float(np.median(fractions)) if fractions else 0.8,
            metrics=tuple(declared),
        )

    def attach(self, run_id: str) -> RunHandle:
        """Follow an existing run (e.g. after a kernel restart), replaying its history."""
        return RunHandle(self.connection, self.run(run_id), None)

    def model_params(self, run_id: str) -> dict[str, np.ndarray]:
        """The final model of run ``run_id`` as arrays by name."""
        return self.connection.model_params(run_id)

    def explain_failure(self, handle: RunHandle, *, site: str | None = None) -> Explanation | None:
        """Re-run, once, the phase of the cell that failed at a site (``site``, else the first that failed) on that
        site's mock, here, with the run's own initial model, config and step seed (``flip_magics.explain``): where
        it fails the same way (the same exception type, cell line and phase), its traceback from this kernel, else
        a sentence saying so. None when no site's cell failed in the run."""
        failure = site_failure(handle.events, site)
        if failure is None:
            return None
        record = record_of(self.run(handle.run_id))
        strategy = make_strategy(record.strategy or "fedavg", record.strategy_options)
        config = {**record.config, **strategy.client_config(), "device": DEVICE}  # as the site handed it to the cell
        announced = record.site_datasets.get(failure.site)
        rows = (announced.train_rows or 0) + (announced.test_rows or 0) if announced else 0
        fraction = announced.train_rows / rows if announced and announced.train_rows and rows else 0.8
        try:
            mock = self._mock_parts(record.dataset, sites=[failure.site])[failure.site]
        except (FlipError, requests.RequestException) as exc:
            return not_replayed(handle.run_id, failure, str(exc))
        outcome = replay(
            handle.source,
            failure,
            mock,
            dataset=record.dataset,
            seed=record.seed,
            config=config,
            train_fraction=fraction,
            initial=handle.task.initial if handle.task is not None else None,
        )
        return explain(handle.run_id, failure, outcome)

    def _mock_parts(self, dataset: str, sites: list[str] | None = None) -> dict[str, Part]:
        """Each site's mock as a mock run's cell reads it: a table's rows, or an imaging dataset's cases with their
        synthetic image files, written here once (:func:`flip_magics.mock_images.mock_cases`)."""
        mocks = self.mock(dataset, sites=sites)
        return {
            site: mock_cases(site, dataset, frame, mocks.images[site]) if site in mocks.images else frame
            for site, frame in mocks.items()
        }


class Mocks(dict[str, pd.DataFrame]):
    """The sites' mocks of one dataset, by site; ``refused``: the sites that sent none, and why; ``images``: an
    imaging dataset's image forms by site, for ``flip_magics.mock_images`` to write its cases' files from."""

    def __init__(self, dataset: str, refused: dict[str, str]) -> None:
        super().__init__()
        self.dataset = dataset
        self.refused = dict(refused)
        self.images: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{site}: {len(frame)} rows" for site, frame in self.items())
        return f"MOCK data of {self.dataset} (synthetic, not for results): {sizes}"


def _declared(covariates: dict[str, Any] | str | None) -> dict[str, Any] | None:
    """A covariate specification given as a dict or its JSON text, as a dict."""
    if not isinstance(covariates, str):
        return covariates
    try:
        spec: dict[str, Any] = json.loads(covariates)
    except json.JSONDecodeError as exc:
        raise RequestInvalid(f"the covariate specification is not JSON ({exc})") from None
    return spec


__all__ = ["ENV_API_TOKEN", "ENV_API_URL", "ENV_PROJECT", "TERMINAL", "FlipClient", "Mocks", "RunHandle"]
