"""Behaviour tests for flip_core.records: two run records side by side, and the inputs that changed."""

from __future__ import annotations

import copy
from typing import Any

from flip_core.records import compare
from flip_core.runs import RunRecord


def raw(run_id: str = "aaa", **over: Any) -> dict[str, Any]:
    """A completed run's record as JSON has it."""
    base: dict[str, Any] = {
        "run_id": run_id,
        "name": "quickstart",
        "created": 1_700_000_000.0,
        "status": "completed",
        "seed": 42,
        "source_hash": "sha256:" + "1" * 64,
        "dataset": "heart-disease",
        "rounds": 2,
        "strategy": "fedavg",
        "config": {"lr": 0.001},
        "sites": ["Cleveland", "VA"],
        "notebook": {"path": "/nb.ipynb", "sha256": "f" * 64, "parameters": {"rounds": 2}},
        "hub_packages": {"flip": "0.1.0", "torch": "2.13.0"},
        "hub_environment": "sha256:" + "2" * 64,
        "site_datasets": {
            "Cleveland": {"name": "heart-disease", "fingerprint": "sha256:c1"},
            "VA": {"name": "heart-disease", "fingerprint": "sha256:v1"},
        },
        "site_info": {
            "Cleveland": {"fingerprint": "sha256:c1", "train_rows": 200, "test_rows": 103, "device": "cpu"},
            "VA": {"fingerprint": "sha256:v1", "train_rows": 130, "test_rows": 70, "device": "cpu"},
        },
        "site_packages": {
            "Cleveland": {"packages": {"torch": "2.13.0"}, "hash": "sha256:" + "3" * 64},
            "VA": {"packages": {"torch": "2.13.0"}, "hash": "sha256:" + "3" * 64},
        },
        "aggregation_ordered": True,
        "history": [
            {"round": r, "site": s, "phase": "evaluate", "metric": "accuracy", "value": 0.5 + r / 10}
            for r in (0, 1, 2)
            for s in ("global", "Cleveland", "VA")
        ],
    }
    base.update(over)
    return base


def record(run_id: str = "aaa", **over: Any) -> RunRecord:
    return RunRecord.model_validate(raw(run_id, **over))


def test_the_same_inputs_and_metrics_are_identical_with_nothing_changed() -> None:
    comparison = compare(record("aaa"), record("bbb"))
    assert comparison.identical and comparison.changes == [] and comparison.notes == []
    assert len(comparison.rows) == 9 and all(r["equal"] for r in comparison.rows)
    assert comparison.rows[0]["site"] == "global"  # global first in each round
    assert "all 9 metrics identical" in comparison.summary()


def test_a_changed_seed_is_named_and_the_differing_metrics_are_counted() -> None:
    b = raw("bbb", seed=7)
    b["history"][-1] = {**b["history"][-1], "value": 0.71}
    comparison = compare(record("aaa"), RunRecord.model_validate(b))
    assert not comparison.identical
    assert comparison.changes == ["the seed changed (42 → 7)"]
    (row,) = comparison.differing
    assert (row["round"], row["site"], row["a"], row["b"]) == (2, "VA", 0.7, 0.71)
    assert "1 of 9 metrics differ" in comparison.summary() and "the seed changed" in comparison.summary()


def test_a_sites_changed_dataset_fingerprint_names_that_site() -> None:
    b = raw("bbb")
    b["site_info"] = copy.deepcopy(b["site_info"])
    b["site_info"]["VA"].update(fingerprint="sha256:v2", train_rows=129)
    changes = compare(record("aaa"), RunRecord.model_validate(b)).changes
    assert changes == ["site VA's dataset fingerprint changed (sha256:v1 → sha256:v2)"]


def test_packages_code_parameters_and_missing_sites_are_each_named() -> None:
    b = raw(
        "bbb",
        source_hash="sha256:" + "9" * 64,
        sites=["Cleveland"],
        notebook={"path": "/nb.ipynb", "sha256": "e" * 64, "parameters": {"rounds": 2, "lr": 0.01}},
        hub_packages={"flip": "0.1.0", "torch": "2.14.0"},
    )
    b["site_packages"] = {"Cleveland": {"packages": {"torch": "2.14.0"}, "hash": "sha256:" + "4" * 64}}
    changes = compare(record("aaa"), RunRecord.model_validate(b)).changes
    assert any(c.startswith("the cell's code hash changed") for c in changes)
    assert "the notebook parameter lr changed (absent → 0.01)" in changes
    assert any(c.startswith("the notebook file changed") for c in changes)
    assert "the hub's torch changed (2.13.0 → 2.14.0)" in changes
    assert "site VA took part in aaa but not in bbb" in changes
    assert "site Cleveland's torch changed (2.13.0 → 2.14.0)" in changes
    assert any(c.startswith("site Cleveland's installed package set changed") for c in changes)


def test_a_metric_missing_from_one_run_is_not_equal() -> None:
    b = raw("bbb")
    b["history"] = b["history"][:-1]
    comparison = compare(record("aaa"), RunRecord.model_validate(b))
    (row,) = comparison.differing
    assert row["b"] is None and row["difference"] is None and not comparison.identical


def test_notes_say_what_breaks_bit_identity_although_no_input_changed() -> None:
    gpu = raw("bbb", config={"lr": 0.001, "dp_epsilon": 2.0}, aggregation_ordered=False)
    gpu["site_info"] = copy.deepcopy(gpu["site_info"])
    gpu["site_info"]["VA"]["device"] = "cuda:0"
    notes = " ".join(compare(record("aaa"), RunRecord.model_validate(gpu)).notes)
    assert "differentially private" in notes and "site VA trained on a GPU (cuda:0)" in notes
    assert "as they arrived" in notes


def test_different_final_models_are_not_identical_even_with_equal_metrics() -> None:
    same = compare(record("aaa", model_sha256="1" * 64), record("bbb", model_sha256="1" * 64))
    assert same.identical and same.same_model and "final models: the same" in same.summary()
    other = compare(record("aaa", model_sha256="1" * 64), record("bbb", model_sha256="2" * 64))
    assert not other.identical and not other.same_model and "final models: different" in other.summary()


def test_runs_without_metrics_are_not_identical() -> None:
    assert not compare(record("aaa", history=[]), record("bbb", history=[])).identical
