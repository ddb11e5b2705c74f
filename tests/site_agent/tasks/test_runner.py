from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flip_core.cell import source_hash
from flip_core.protocol import StepRequest
from flip_core.status import Phase
from site_agent.data.catalog import SiteConfig, init_site
from site_agent.data.formats import add_dataset
from site_agent.tasks.runner import TaskSession

from helpers import TINY_CELL

INITIAL = {"weight": np.zeros((1, 3), dtype=np.float32), "bias": np.zeros((1,), dtype=np.float32)}


@pytest.fixture
def site(tmp_path: Path, heart_dir: Path) -> SiteConfig:
    return add_dataset(
        init_site(tmp_path / "site", "Cleveland"), "heart-disease", heart_dir / "processed.cleveland.data", "uci-heart"
    )


def request(source: str, phase: str = Phase.FIT, dataset: str = "heart-disease", round_: int = 1) -> StepRequest:
    return StepRequest(
        run_id="r1",
        source=source,
        source_hash=source_hash(source),
        dataset=dataset,
        project="p",
        researcher="alice",
        seed=3,
        round=round_,
        phase=phase,
        config={},
        params=INITIAL,
    )


def test_fit_step_returns_trained_params_and_metrics(site: SiteConfig) -> None:
    result = TaskSession(site).step(request(TINY_CELL, round_=2))
    assert result.status == "ok", result
    assert {k: v.shape for k, v in result.params.items()} == {"weight": (1, 3), "bias": (1,)}
    assert not np.allclose(result.params["weight"], 0)
    assert set(result.train_metrics) == {"loss"}
    assert 0.0 <= result.eval_metrics["accuracy"] <= 1.0  # the incoming global model, evaluated first
    assert result.num_train == site.datasets["heart-disease"].train_rows


def test_prepare_evaluates_the_initial_model_and_round_one_does_not_again(site: SiteConfig) -> None:
    session = TaskSession(site)
    prepared = session.step(request(TINY_CELL, phase=Phase.PREPARE, round_=0))
    assert prepared.status == "ok" and prepared.params == {} and prepared.train_metrics == {}
    assert 0.0 <= prepared.eval_metrics["accuracy"] <= 1.0
    first = session.step(request(TINY_CELL, round_=1))
    assert first.status == "ok" and first.eval_metrics == {} and set(first.train_metrics) == {"loss"}


def test_steps_are_reproducible_for_the_same_seed_and_round(site: SiteConfig) -> None:
    a = TaskSession(site).step(request(TINY_CELL))
    b = TaskSession(site).step(request(TINY_CELL))
    assert np.array_equal(a.params["weight"], b.params["weight"])


def test_evaluate_phase_returns_no_params(site: SiteConfig) -> None:
    result = TaskSession(site).step(request(TINY_CELL, phase=Phase.EVALUATE))
    assert result.status == "ok" and result.params == {} and result.train_metrics == {}
    assert "accuracy" in result.eval_metrics


def test_exception_reports_type_and_cell_line_but_never_its_message(site: SiteConfig) -> None:
    source = TINY_CELL.replace(
        "    X, y = _xy(data.train)\n", "    X, y = _xy(data.train)\n    raise ValueError('patient Qzx-Wvk')\n"
    )
    line = source.splitlines().index("    raise ValueError('patient Qzx-Wvk')") + 1
    result = TaskSession(site).step(request(source))
    assert (result.status, result.error_type, result.error_line) == ("error", "ValueError", line)
    assert result.error_where == "train()"
    assert "Qzx-Wvk" in result.detail  # the traceback, a claim the agent keeps in the site's airlock (the guard
    assert "Qzx-Wvk" not in repr(replace(result, detail=""))  # drops it); no other field holds the message
    assert result.params == {}


def test_syntax_error_is_reported_with_its_line(site: SiteConfig) -> None:
    result = TaskSession(site).step(request("def build_model(:\n    pass\n"))
    assert (result.status, result.error_type, result.error_line) == ("error", "SyntaxError", 1)


def test_missing_function_is_named(site: SiteConfig) -> None:
    result = TaskSession(site).step(request("def build_model():\n    pass\n"))
    assert result.error_type == "MissingFunction" and result.error_where == "train, evaluate"


def test_non_numeric_metric_is_refused(site: SiteConfig) -> None:
    source = TINY_CELL.replace('return {"loss": loss.item()}', 'return {"loss": "rows: 1,2,3"}')
    result = TaskSession(site).step(request(source))
    assert result.error_type == "BadMetric"


def test_dataset_not_held_is_no_dataset(site: SiteConfig) -> None:
    assert TaskSession(site).step(request(TINY_CELL, dataset="lungs")).status == "no-dataset"


def test_task_output_goes_to_the_site_log_only(site: SiteConfig, capsys: pytest.CaptureFixture[str]) -> None:
    source = TINY_CELL.replace(
        "def train(model, data, config):\n",
        "def train(model, data, config):\n    print('ROW', data.train.iloc[0].to_dict())\n",
    )
    TaskSession(site).step(request(source))
    assert "ROW" not in capsys.readouterr().out
    assert "ROW" in (site.root / "logs" / "run-r1.log").read_text()


@pytest.mark.parametrize(
    ("raised", "told"),
    [
        ("type('LEAK' + str(len(data.train)), (Exception,), {})()", "Exception"),
        ("type('Oops', (KeyError,), {'__module__': 'LEAK1', '__qualname__': 'LEAK1'})()", "KeyError"),
        ("type('ValueError', (ArithmeticError,), {})()", "ArithmeticError"),
    ],
)
def test_a_failure_is_named_by_its_standard_type_whatever_the_cell_called_it(
    site: SiteConfig, raised: str, told: str
) -> None:
    source = TINY_CELL.replace("    X, y = _xy(data.train)\n", f"    X, y = _xy(data.train)\n    raise {raised}\n")
    result = TaskSession(site).step(request(source))
    assert (result.status, result.error_type, result.error_where) == ("error", told, "train()")


def test_an_unusable_device_says_nothing_of_its_own(site: SiteConfig) -> None:
    result = TaskSession(site, unusable="torch sees 0 devices, LEAK1").step(request(TINY_CELL))
    assert (result.status, result.error_type, result.error_where) == ("error", "DeviceUnavailable", "")


def test_report_runs_at_the_final_evaluation_only_and_its_failure_does_not_fail_the_step(site: SiteConfig) -> None:
    reporting = TINY_CELL + "\ndef report(model, data, config):\n    return {'rows': len(data.test), 'm': [[1, 2]]}\n"
    final = TaskSession(site).step(request(reporting, phase=Phase.EVALUATE, round_=2))
    assert final.status == "ok" and json.loads(final.report)["tables"]["m"]["rows"] == [[1, 2]]
    assert TaskSession(site).step(request(reporting, round_=2)).report == ""  # a fit step: no report
    failing = TINY_CELL + "\ndef report(model, data, config):\n    raise KeyError('LEAK')\n"
    broken = TaskSession(site).step(request(failing, phase=Phase.EVALUATE, round_=2))
    assert broken.status == "ok" and "KeyError: 'LEAK'" in json.loads(broken.report)["traceback"]
