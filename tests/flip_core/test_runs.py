"""Behaviour tests for flip_core.runs: the task a run carries to the ServerApp, and the run record that outlives it."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from pydantic import ValidationError

from flip_core.errors import RequestInvalid
from flip_core.parsing import parse
from flip_core.runs import CohortRef, RunRecord, SiteUse, Task, record_of

SHA = "c" * 64
ENV = "sha256:" + "e" * 64
HEART = {
    "name": "heart-disease",
    "format": "csv",
    "rows": 200,
    "train_rows": 130,
    "test_rows": 70,
    "columns": ["age", "target"],
    "dtypes": ["int64", "int64"],
    "fingerprint": "sha256:f1",
    "inclusion": None,
}

# A completed run's record as the previous version wrote it (coordinator.service before the models), status added
# as GET /api/runs/ID added it.
PREVIOUS: dict[str, Any] = {
    "run_id": "0a1b2c3d4e",
    "name": "quickstart",
    "project": "heart",
    "researcher": "alice",
    "dataset": "heart-disease",
    "rounds": 2,
    "strategy": "fedavg",
    "strategy_options": {},
    "min_sites": 1,
    "round_timeout": None,
    "seed": 42,
    "config": {"lr": 0.01, "dp_epsilon": 2.0, "dp_clip": 1.0, "dp_rounds": 2},
    "source_hash": "sha256:" + "1" * 64,
    "sites": ["VA"],
    "initial_model_sha256": "a" * 64,
    "fab_sha256": "b" * 64,
    "created": 1_700_000_000.5,
    "hub_packages": {"python": "3.11.9", "flip": "0.1.0", "torch": "2.13.0"},
    "hub_environment": ENV,
    "client_packages": {"python": "3.11.9", "flip": "0.1.0"},
    "client_environment": ENV,
    "site_packages": {"VA": {"packages": {"torch": "2.13.0"}, "hash": ENV}},
    "site_datasets": {"VA": HEART},
    "cohort": {"name": "over-60", "where": "age > 60", "sites": {"VA": {"rows": 41, "hash": "sha256:k"}}},
    "notebook": {"path": "/q.ipynb", "sha256": "d" * 64, "parameters": {"rounds": 2}, "execution": "e1", "cell": 1},
    "seed_rule": "sha256('SEED:ROUND:SITE')[:4] little-endian, before each step (flip_core.cell.step_seed)",
    "step_seeds": {"VA": [11, 12, 13]},
    "flower_run_id": 18446744073709551615,
    "model_sha256": SHA,
    "site_info": {
        "VA": {"version": "0.1.0", "fingerprint": "sha256:f1", "train_rows": 130, "test_rows": 70, "device": "cpu"}
    },
    "failed_sites": {},
    "traffic": {"VA": [{"round": 1, "phase": "fit", "received_bytes": 1000, "sent_bytes": 900}]},
    "aggregation_ordered": True,
    "history": [{"round": 2, "site": "global", "phase": "evaluate", "metric": "loss", "value": 0.3}],
    "epsilon_spent": {"VA": 1.5, "global": 1.5},
    "started": 1_700_000_001.0,
    "status": "completed",
    "reason": "",
    "finished": 1_700_000_090.0,
}

# A record as FLIP wrote it before run records named environments, notebooks and seeds (and so before metrics).
OLDEST: dict[str, Any] = {
    key: PREVIOUS[key]
    for key in ("run_id", "name", "project", "researcher", "dataset", "rounds", "strategy", "strategy_options")
    + ("min_sites", "round_timeout", "seed", "config", "source_hash", "sites", "initial_model_sha256", "fab_sha256")
    + ("created", "client_packages", "site_datasets", "flower_run_id", "model_sha256", "site_info")
}


def _task(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run_id": "0a1b2c3d4e",
        "name": "quickstart",
        "project": "heart",
        "researcher": "alice",
        "source": "def build_model(): pass",
        "source_hash": "sha256:" + "1" * 64,
        "dataset": "heart-disease",
        "rounds": 2,
        "strategy": "fedavg",
        "strategy_options": {},
        "min_sites": 1,
        "seed": 42,
        "config": {"lr": 0.01},
        "initial_model": "a" * 64,
        "round_timeout": None,
        "cohort": None,
        "sites": [{"site": "VA", "node_id": 10, "dataset": HEART, "packages": {"torch": "2.13.0"}, "environment": ENV}],
        "metrics": ["loss", "accuracy"],
        "covariates": None,
    }
    return {**body, **over}


def test_a_record_the_previous_version_wrote_loads_typed_and_round_trips_to_the_same_json() -> None:
    record = RunRecord.model_validate_json(json.dumps(PREVIOUS))
    assert record.model_sha256 == SHA and record.site_info["VA"].train_rows == 130
    assert record.cohort is not None and record.cohort.sites["VA"].rows == 41
    assert record.notebook is not None and record.notebook.parameters == {"rounds": 2}
    assert record.history[0].value == 0.3 and record.traffic["VA"][0].sent_bytes == 900
    assert record.site_datasets["VA"].fingerprint == "sha256:f1" and record.flower_run_id == 2**64 - 1
    assert record.as_dict() == PREVIOUS
    assert json.loads(json.dumps(record.as_dict())) == PREVIOUS


def test_an_older_record_loads_with_its_missing_keys_at_their_defaults_and_writes_back_only_its_own() -> None:
    record = RunRecord.model_validate(OLDEST)
    assert (record.hub_environment, record.notebook, record.cohort, record.history) == ("", None, None, [])
    assert record.status == "" and record.started is None and record.site_info["VA"].threads is None
    assert record.as_dict() == OLDEST


def test_a_failed_run_has_no_model_and_a_mock_is_marked() -> None:
    failed = RunRecord.model_validate({**OLDEST, "model_sha256": None, "status": "failed", "reason": "boom"})
    assert failed.model_sha256 is None and not failed.mock
    mock = RunRecord(run_id="mock-1", name="MOCK q", dataset="d", rounds=1, seed=0, source_hash="", sites=[],
                     created=0.0, mock=True, mock_rows={"VA": 50})  # fmt: skip
    assert mock["mock"] is True and mock["mock_rows"] == {"VA": 50} and "model_sha256" not in mock


def test_keys_this_version_does_not_know_are_kept() -> None:
    later = copy.deepcopy(PREVIOUS)
    later["energy_kwh"] = 0.25
    later["site_info"]["VA"]["gpu_model"] = "H100"
    later["site_datasets"]["VA"]["modality"] = "tabular"
    record = RunRecord.model_validate(later)
    assert record.as_dict() == later and record["energy_kwh"] == 0.25
    assert record.site_info["VA"].model_extra == {"gpu_model": "H100"}


def test_a_record_reads_as_the_dict_it_was_for_notebooks_written_before_the_model() -> None:
    record = record_of({"run_id": "0a1b2c3d4e", "record": PREVIOUS})
    assert record["model_sha256"] == SHA and record["cohort"]["name"] == "over-60"
    assert record["site_datasets"]["VA"]["fingerprint"] == "sha256:f1"
    assert record.get("no such key", "absent") == "absent" and "history" in record
    assert dict(record) == PREVIOUS and {**record} == PREVIOUS and set(record.keys()) == set(PREVIOUS)
    with pytest.raises(KeyError):
        record["no such key"]


def test_updating_a_record_types_the_new_fields_and_refuses_a_wrong_one() -> None:
    record = RunRecord.model_validate(OLDEST)
    done = record.updated(site_info={"VA": {"device": "cuda:0", "threads": 8}}, started=5.0)
    assert done.site_info["VA"] == SiteUse(device="cuda:0", threads=8) and done.started == 5.0
    assert set(done.as_dict()) == set(OLDEST) | {"started"} and record.started is None  # records are frozen
    with pytest.raises(ValidationError):
        record.updated(history=[{"round": "last"}])


def test_a_task_parses_from_its_json_and_back() -> None:
    task = parse(Task, json.dumps(_task()), "the run's task")
    assert task.sites[0].node_id == 10 and task.sites[0].dataset.rows == 200 and task.cohort is None
    assert json.loads(task.model_dump_json()) == _task()
    cohort = {"name": "over-60", "where": "age > 60", "sites": {"VA": {"rows": None, "hash": "sha256:k"}}}
    assert parse(Task, _task(cohort=cohort), "the run's task").cohort == CohortRef.model_validate(cohort)


@pytest.mark.parametrize(
    ("over", "said"),
    [
        ({"rounds": "2"}, "the run's task: field 'rounds' must be a whole number, not \"2\""),
        ({"min_sites": 0}, "the run's task: field 'min_sites' must be at least 1, not 0"),
        ({"sites": []}, "the run's task: field 'sites' "),
        ({"source": None}, "the run's task: field 'source' must be text, not null"),
        ({"extra": 1}, "the run's task: field 'extra' is not a field of this request"),
    ],
)
def test_a_malformed_task_is_refused_in_a_sentence_naming_the_field(over: dict[str, Any], said: str) -> None:
    with pytest.raises(RequestInvalid) as refused:
        parse(Task, _task(**over), "the run's task")
    assert str(refused.value).startswith(said)


def test_a_task_sites_node_and_name_are_checked_too() -> None:
    site = {"site": "VA", "node_id": -1, "dataset": HEART}
    with pytest.raises(RequestInvalid, match=r"field 'sites.0.node_id' must be at least 0, not -1"):
        parse(Task, _task(sites=[site]), "the run's task")
    with pytest.raises(RequestInvalid, match=r"field 'sites.0.site': '\.\./x' is not a site name"):
        parse(Task, _task(sites=[{**site, "node_id": 1, "site": "../x"}]), "the run's task")
