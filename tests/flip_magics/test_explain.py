"""A run's failure at a site re-run on that site's mock in the kernel (flip_magics.explain, FlipClient.explain_failure):
the failing phase once, with the run's own initial model, config and step seed; the mock's traceback shown, labelled
as the mock's, only where the mock fails the same way (type, cell line, phase); a sentence otherwise; and the magic's
static copy of the failed run carries it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pytest

from flip_core.runs import RunRecord
from flip_core.status import EventType, RunStatus, SiteState
from flip_magics import magics
from flip_magics.client import FlipClient
from flip_magics.explain import site_failure
from flip_magics.task import prepare

from fakes import FakeDisplay, FakeFailedRun, FakeRunConnection
from helpers import TINY_CELL

RUN = "r-failed"
MISSING = '    X = X * df["chol"].mean()'  # the mock has no chol: a KeyError here, at the site as on the mock
SOURCE = TINY_CELL.replace("    return X, y\n", f"{MISSING}\n    return X, y\n")
LINE = SOURCE.splitlines().index(MISSING) + 1


def mock_reply(rows: int = 30, seed: int = 2) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame(
        {
            "age": rng.integers(30, 80, rows),
            "trestbps": rng.integers(90, 180, rows),
            "thalach": rng.integers(90, 200, rows),
        }
    ).assign(num=rng.integers(0, 3, rows))
    return {"columns": list(table.columns), "dtypes": [str(t) for t in table.dtypes], "rows": table.to_numpy().tolist()}


def failed(site: str, detail: str, round_: int = 0) -> dict[str, Any]:
    return {"type": EventType.SITE, "site": site, "status": SiteState.FAILED, "round": round_, "detail": detail}


def client_for(source: str, mocks: dict[str, dict[str, Any]], **record: Any) -> tuple[FlipClient, FakeRunConnection]:
    fields = {
        "run_id": RUN,
        "name": "failing",
        "dataset": "heart-disease",
        "rounds": 1,
        "seed": 4,
        "source_hash": "h",
        "sites": ["Hungary"],
        "created": 0.0,
        "strategy": "fedavg",
        "site_datasets": {"Hungary": {"name": "heart-disease", "train_rows": 80, "test_rows": 20}},
        **record,
    }
    connection = FakeRunConnection({"run_id": RUN, "source": source, "record": RunRecord(**fields).as_dict()}, mocks)
    client = FlipClient("http://127.0.0.1:9", "unused")
    client.connection = connection  # type: ignore[assignment]
    return client, connection


def explained(source: str, detail: str, mocks: dict[str, dict[str, Any]] | None = None, **record: Any) -> Any:
    client, _ = client_for(source, {"Hungary": mock_reply()} if mocks is None else mocks, **record)
    return client.explain_failure(FakeFailedRun([failed("Hungary", detail)], source, prepare(source, seed=4)))


def test_the_first_failed_step_of_the_cell_is_read_back_from_the_runs_events() -> None:
    events = [
        {"type": EventType.SITE, "site": "Cleveland", "status": SiteState.TRAINING, "round": 1},
        failed("VA", "the site's Flower node reported an error (gone)"),
        failed("VA", "DatasetChanged in dataset 'x' at VA"),  # not a phase of the cell: its data, not its code
        failed("Hungary", f"KeyError at cell line {LINE} in evaluate()", 2),
        failed("Cleveland", "ZeroDivisionError in train()", 3),
    ]
    first = site_failure(events)
    assert first is not None and (first.site, first.error_type, first.line, first.where, first.round) == (
        "Hungary",
        "KeyError",
        LINE,
        "evaluate()",
        2,
    )
    chosen = site_failure(events, "Cleveland")
    assert chosen is not None and (chosen.error_type, chosen.line, chosen.where) == ("ZeroDivisionError", 0, "train()")
    assert site_failure(events[:3]) is None


def test_a_failure_the_mock_repeats_shows_the_mocks_traceback_labelled_as_the_mocks() -> None:
    client, connection = client_for(SOURCE, {"Hungary": mock_reply(), "VA": mock_reply()})
    run = FakeFailedRun([failed("Hungary", f"KeyError at cell line {LINE} in evaluate()")], SOURCE, prepare(SOURCE, 4))
    explanation = client.explain_failure(run)
    assert explanation is not None and explanation.same and explanation.site == "Hungary"
    assert explanation.text.startswith(
        "This is the traceback of the same failure on Hungary's MOCK data, in this kernel; the site's own traceback "
        f'stays at the site: ask for it with %flip_request traceback {RUN} --site Hungary --purpose "..."\n\n'
    )
    assert explanation.traceback in explanation.text and MISSING.strip() in explanation.traceback
    assert explanation.traceback.rstrip().endswith("KeyError: 'chol'")
    assert connection.asked[-1]["sites"] == ["Hungary"]  # that site's mock alone


def test_a_failure_the_mock_does_not_repeat_is_said_in_one_sentence() -> None:
    other_line = explained(SOURCE, f"KeyError at cell line {LINE + 1} in evaluate()")
    assert not other_line.same and other_line.traceback == "" and "\n" not in other_line.text
    assert other_line.text.startswith(
        f"On Hungary's MOCK data, in this kernel, the cell fails another way (KeyError at cell line {LINE} in "
        f"evaluate()) than at the site (KeyError at cell line {LINE + 1} in evaluate())"
    )
    through = explained(TINY_CELL, "ValueError at cell line 14 in train()")
    assert not through.same and "\n" not in through.text
    assert through.text.startswith(
        "On Hungary's MOCK data, in this kernel, train() runs without failing, so the site's"
    )
    refused = explained(SOURCE, f"KeyError at cell line {LINE} in evaluate()", mocks={})
    assert not refused.same and refused.text.startswith(
        f"Hungary's KeyError at cell line {LINE} in evaluate() could not be re-run on its MOCK data in this kernel: "
        "no site sent a mock of 'heart-disease': Hungary: "
    )


def test_the_replay_gives_the_phase_the_runs_initial_model_config_round_and_the_sites_split() -> None:
    check = (
        "\ndef evaluate(model, data, config):\n"
        "    told = (model.bias.item(), config['lr'], config['device'], data.round, len(data.train), len(data.test))\n"
        "    raise KeyError(told)\n"
    )
    source = TINY_CELL + check
    line = source.splitlines().index("    raise KeyError(told)") + 1
    task = prepare(source, seed=4)
    task.initial["bias"] = np.array([0.5], dtype=np.float32)  # the run's own initial model, not a rebuilt one
    client, _ = client_for(source, {"Hungary": mock_reply(rows=40)}, config={"lr": 0.25})
    run = FakeFailedRun([failed("Hungary", f"KeyError at cell line {line} in evaluate()", 3)], source, task)
    explanation = client.explain_failure(run)
    assert explanation is not None and explanation.same
    assert "KeyError: (0.5, 0.25, 'cpu', 3, 32, 8)" in explanation.traceback  # 80% of the mock's 40 rows train


def test_a_completed_run_has_nothing_to_explain() -> None:
    client, connection = client_for(SOURCE, {"Hungary": mock_reply()})
    assert client.explain_failure(FakeFailedRun([], SOURCE)) is None and connection.asked == []


def test_the_failed_runs_static_copy_carries_the_explanation_made_once(monkeypatch: pytest.MonkeyPatch) -> None:
    shown = FakeDisplay()
    monkeypatch.setattr(magics, "display", shown)
    client, connection = client_for(SOURCE, {"Hungary": mock_reply()})
    run = FakeFailedRun([failed("Hungary", f"KeyError at cell line {LINE} in evaluate()")], SOURCE, prepare(SOURCE, 4))
    assert run.status == RunStatus.FAILED
    magics.show_run(run, explain=client.explain_failure)  # type: ignore[arg-type]
    final = shown.updates[-1]
    assert "same failure on Hungary's MOCK data" in final["text/plain"] and "KeyError: 'chol'" in final["text/plain"]
    assert (
        "Hungary&#x27;s MOCK data" in final["text/html"] and '<pre class="flip-mock-explanation">' in final["text/html"]
    )
    assert len(connection.asked) == 1  # told to both threads, re-run once
