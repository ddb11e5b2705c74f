"""Behaviour tests for flip_magics.provenance: what a task carries of the notebook flip run is executing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flip_core.api import TaskSpec, parse
from flip_magics import provenance


def test_outside_flip_run_a_task_names_no_notebook_but_its_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(provenance.ENV_NOTEBOOK, raising=False)
    fields = provenance.task_provenance()
    assert "notebook" not in fields and {"torch", "flwr", "flip"} <= set(fields["client_packages"])
    assert fields["client_environment"].startswith("sha256:")


def test_under_flip_run_each_task_names_the_notebook_and_its_place(monkeypatch: pytest.MonkeyPatch) -> None:
    notebook = {"path": "/n.ipynb", "sha256": "a" * 64, "parameters": {"rounds": 3}, "execution": "x1"}
    monkeypatch.setenv(provenance.ENV_NOTEBOOK, json.dumps(notebook))
    first, second = provenance.task_provenance(), provenance.task_provenance()
    assert second["notebook"]["cell"] == first["notebook"]["cell"] + 1
    spec = parse(TaskSpec, {"source": "x", "dataset": "d", **first}, "the task")  # the contract takes it
    assert spec.notebook is not None and spec.notebook.parameters == {"rounds": 3}


def test_submitted_runs_are_logged_only_under_flip_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(provenance.ENV_RUN_LOG, raising=False)
    provenance.log_run("nowhere")
    log = tmp_path / "runs.log"
    monkeypatch.setenv(provenance.ENV_RUN_LOG, str(log))
    provenance.log_run("abc")
    provenance.log_run("def")
    assert log.read_text().split() == ["abc", "def"]
