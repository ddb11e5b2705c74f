"""The query desk: a query waits for the query line, which the desk starts, adopts after a restart, retires
and restarts when it failed; only Flower's control API is a fake (named so), the rest is the real desk."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from coordinator.queries import LineRetired, QueryDesk
from coordinator.service import Principal, RunManager, TaskRejected
from coordinator.store import Store
from flip_core.api import QuerySpec, TaskSpec, parse
from flip_core.errors import Rejected

from fakes import FakeControl, FakeFlowerStatus

WHO = Principal("alice", "heart")
DATASET = {
    "name": "heart-disease",
    "rows": 100,
    "columns": ["age", "sex"],
    "dtypes": ["float64", "float64"],
    "projects": ["heart"],
}


def desk(tmp_path) -> tuple[QueryDesk, FakeControl]:
    control = FakeControl()
    manager = RunManager(Store(tmp_path), control, lambda: None, presence_grace=0)
    for node, site in enumerate(("Hungary", "VA"), start=1):
        manager.announce(site, node, {"version": "0.1.0", "datasets": [DATASET]}, "online")
        manager.presence.hold(site)
    return QueryDesk(manager), control


def spec(**fields: Any) -> QuerySpec:
    return parse(QuerySpec, {"dataset": "heart-disease", "kind": "count", **fields}, "the query")


def released(site: str, count: int) -> dict[str, Any]:
    table = {"dims": [], "levels": [], "cells": [count], "total": count}
    return {"site": site, "status": "ok", "threshold": 10, "table": table}


def serve_once(
    queries: QueryDesk, line: int, answers: dict[str, int], started: threading.Event | None = None
) -> threading.Thread:
    """A stand-in for the query line (a thread, not a Flower run): take one query, answer for each site.
    With ``started``: only once the desk has started its line (as a Flower run would begin then)."""

    def line_loop() -> None:
        if started is not None:
            assert started.wait(10)
        work = queries.next(line, 10)
        assert work is not None
        replies = [released(t["site"], answers[t["site"]]) for t in work["targets"]]
        queries.answer(work["request"]["query_id"], replies)

    thread = threading.Thread(target=line_loop, daemon=True)
    thread.start()
    return thread


def test_the_first_query_starts_the_line_and_gets_the_pooled_answer(tmp_path) -> None:
    queries, control = desk(tmp_path)
    started, real_start = threading.Event(), control.start_run
    control.start_run = lambda run_id: (real_start(run_id), started.set())[0]  # type: ignore[method-assign]
    line = serve_once(queries, 1001, {"Hungary": 30, "VA": 12}, started)  # 1001: FakeControl's first run id
    answer = queries.ask(WHO, spec(where="age > 50", text="heart-disease count where age > 50"))
    line.join(5)
    assert control.started == ["query-line"]
    assert answer["pooled"]["total"] == 42 and sorted(answer["sites"]) == ["Hungary", "VA"]
    assert answer["where"] == "age > 50" and answer["refused"] == {}


def test_a_line_that_outlived_a_coordinator_restart_is_adopted_and_another_retired(tmp_path) -> None:
    queries, control = desk(tmp_path)
    assert queries.next(4242, 0) is None  # the old line asks first: adopted, no new line started
    line = serve_once(queries, 4242, {"Hungary": 30, "VA": 12})
    assert queries.ask(WHO, spec())["pooled"]["total"] == 42
    line.join(5)
    assert control.started == []
    with pytest.raises(LineRetired):
        queries.next(777, 0)


def test_a_failed_line_is_restarted_once_then_the_query_is_refused_in_a_sentence(tmp_path) -> None:
    queries, control = desk(tmp_path)
    real_start = control.start_run

    def failing_start(flip_run_id: str) -> int:
        run = real_start(flip_run_id)
        control.statuses[run] = FakeFlowerStatus("finished", "failed", "ServerApp raised ConnectionError")
        return run

    control.start_run = failing_start  # type: ignore[method-assign]
    with pytest.raises(TaskRejected) as refused:
        queries.ask(WHO, spec())
    assert control.started == ["query-line", "query-line"]
    assert refused.value.status == 503 and "ServerApp raised ConnectionError" in str(refused.value)


def test_unknown_dataset_site_or_column_is_refused_before_anything_is_queued(tmp_path) -> None:
    queries, control = desk(tmp_path)
    for wrong, says in [
        (spec(dataset="heart"), "unknown dataset 'heart'"),
        (spec(sites=["Cleveland"]), "no site 'Cleveland' holds 'heart-disease'"),
        (spec(kind="stats", columns=["chol"]), "unknown column 'chol'"),
        (spec(where="chol > 1"), "unknown column 'chol'"),
    ]:
        with pytest.raises(Rejected) as e:
            queries.ask(WHO, wrong)
        assert says in str(e.value)
    assert control.started == []


def test_a_query_within_a_cohort_asks_its_sites_and_names_its_index_dates_columns(tmp_path) -> None:
    """Within a cohort the book does not hold, or of another dataset, a query is refused before anything is queued;
    within a Circe cohort (its index dates) a query may name each person's age, age group and year at it, and goes
    to the sites that froze the cohort only. ``top`` is for an OMOP database."""
    queries, control = desk(tmp_path)
    frozen = {"VA": {"rows": 40, "hash": "hmac-sha256:x"}}
    queries.manager.cohorts.put("heart", "dated", "heart-disease", "circe:abc", frozen)
    queries.manager.cohorts.put("heart", "filtered", "heart-disease", "age > 50", frozen)
    for wrong, says in [
        (spec(cohort="nowhere"), "no cohort 'nowhere' in project 'heart' (its cohorts: dated, filtered)"),
        (spec(kind="count", columns=["age_group"], cohort="filtered"), "unknown column 'age_group'"),
        (spec(kind="top", columns=["condition"]), "top counts an OMOP database's concepts; 'heart-disease' at Hungary"),
    ]:
        with pytest.raises(Rejected) as e:
            queries.ask(WHO, wrong)
        assert says in str(e.value)
    assert control.started == []
    started, real_start = threading.Event(), control.start_run
    control.start_run = lambda run_id: (real_start(run_id), started.set())[0]  # type: ignore[method-assign]
    line = serve_once(queries, 1001, {"VA": 40}, started)  # the desk's own line, once started (no race to adopt)
    answer = queries.ask(WHO, spec(columns=["age_group", "index_year"], cohort="dated"))
    line.join(5)
    assert list(answer["sites"]) == ["VA"] and answer["pooled"]["total"] == 40


def test_a_query_and_a_run_refuse_an_unknown_dataset_in_the_same_sentence(tmp_path) -> None:
    queries, _ = desk(tmp_path)
    with pytest.raises(TaskRejected) as asked:
        queries.ask(WHO, spec(dataset="heart"))
    with pytest.raises(TaskRejected) as run:
        queries.manager.check(WHO, parse(TaskSpec, {"dataset": "heart", "source": "x = 1"}, "the task"))
    assert str(asked.value) == str(run.value) == "unknown dataset 'heart': the datasets that exist are heart-disease"
    assert asked.value.status == run.value.status == 404
