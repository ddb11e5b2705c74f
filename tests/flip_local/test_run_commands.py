"""Behaviour tests for the recorded-run commands' pure parts: parameters, the record's text, the parser."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flip_core.runs import RunRecord
from flip_local.cli import _parser
from flip_local.notebook_runs import NotebookFailed, parse_value, rerun
from flip_local.record_text import describe

from fakes import FakeRecordClient


def test_parameters_are_read_as_papermill_reads_them() -> None:
    assert [parse_value(v) for v in ("3", "0.5", "true", "False", "none", "fedavg", "1e-3")] == [
        3,
        0.5,
        True,
        False,
        None,
        "fedavg",
        0.001,
    ]


def test_the_commands_parse_their_options() -> None:
    args = _parser().parse_args(["run", "nb.ipynb", "-p", "rounds", "3", "-p", "seed", "7", "--out", "o"])
    assert args.parameter == [["rounds", "3"], ["seed", "7"]] and args.out == Path("o")
    args = _parser().parse_args(["rerun", "abc", "--url", "http://h", "--token", "t"])
    assert (args.run_id, args.url, args.token) == ("abc", "http://h", "t")
    assert _parser().parse_args(["export", "abc", "dir"]).dir == Path("dir")


BARE = {  # the keys every run record has; a record names no notebook unless `flip run` made its run
    "run_id": "abc",
    "name": "run",
    "dataset": "heart-disease",
    "rounds": 1,
    "seed": 0,
    "source_hash": "",
    "sites": [],
    "created": 0.0,
}


def test_a_run_not_made_by_flip_run_cannot_be_rerun_and_says_why(tmp_path: Path) -> None:
    with pytest.raises(NotebookFailed, match="run abc was not made by `flip run`"):
        rerun("abc", {}, tmp_path, client=FakeRecordClient(BARE))  # type: ignore[arg-type]
    gone = {**BARE, "notebook": {"path": str(tmp_path / "gone.ipynb"), "parameters": {}}}
    with pytest.raises(NotebookFailed, match="gone.ipynb is not there any more"):
        rerun("abc", {}, tmp_path, client=FakeRecordClient(gone))  # type: ignore[arg-type]


def test_flip_show_prints_what_ran_on_what_and_what_came_out() -> None:
    record = {
        "run_id": "abc",
        "name": "quickstart",
        "status": "completed",
        "researcher": "alice",
        "project": "default",
        "dataset": "heart-disease",
        "rounds": 2,
        "strategy": "fedavg",
        "seed": 42,
        "source_hash": "sha256:" + "1" * 64,
        "created": 1_700_000_000.0,
        "sites": ["VA"],
        "notebook": {"path": "/q.ipynb", "sha256": "ab" * 32, "parameters": {"rounds": 2}},
        "site_info": {"VA": {"train_rows": 130, "test_rows": 70, "device": "cpu", "fingerprint": "sha256:0123"}},
        "site_packages": {"VA": {"packages": {"torch": "2.13.0"}, "hash": "sha256:" + "9" * 64}},
        "traffic": {"VA": [{"round": 1, "phase": "fit", "received_bytes": 1_000_000, "sent_bytes": 500_000}]},
        "history": [
            {"round": 1, "site": "VA", "phase": "evaluate", "metric": "accuracy", "value": 0.5},
            {"round": 2, "site": "VA", "phase": "evaluate", "metric": "accuracy", "value": 0.75},
        ],
    }
    text = describe(RunRecord.model_validate(record))
    assert "run abc 'quickstart': completed" in text and "seed 42" in text and "/q.ipynb" in text
    assert "VA" in text and "train 130, test 70, cpu" in text and "torch 2.13.0" in text and "1.5 MB moved" in text
    assert "evaluate accuracy 0.75" in text
    assert json.dumps(record)  # a record is plain JSON


def test_a_hub_and_a_headless_token_reach_the_notebooks_kernel_through_its_environment(monkeypatch) -> None:
    from flip_local import run_commands
    from flip_magics.client import ENV_API_TOKEN, ENV_API_URL, FlipClient

    for name in (ENV_API_URL, ENV_API_TOKEN, "JUPYTERHUB_API_TOKEN"):
        monkeypatch.setenv(name, "")  # recorded, so that what _client sets is undone after the test
        monkeypatch.delenv(name)
    args = _parser().parse_args(["runs", "--url", "https://hub.example:8900", "--token", "tok"])
    client = run_commands._client(args)
    assert client.url == "https://hub.example:8900" and client.token == "tok"
    kernel_side = FlipClient.from_environment()  # what the kernel that flip run starts finds
    assert (kernel_side.url, kernel_side.token) == ("https://hub.example:8900", "tok")
    with pytest.raises(Exception, match="--url needs --token"):
        run_commands._client(_parser().parse_args(["runs", "--url", "https://hub.example:8900"]))
