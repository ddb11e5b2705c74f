from __future__ import annotations

import numpy as np
import pytest

from flip_core.errors import TaskInvalid
from flip_magics.magics import parse_config
from flip_magics.task import load_weights, metrics_to_declare, prepare

from helpers import TINY_CELL


def test_prepare_builds_seeded_initial_weights() -> None:
    a, b = prepare(TINY_CELL, seed=5), prepare(TINY_CELL, seed=5)
    assert {k: v.shape for k, v in a.initial.items()} == {"weight": (1, 3), "bias": (1,)}
    assert np.array_equal(a.initial["weight"], b.initial["weight"])
    assert not np.array_equal(a.initial["weight"], prepare(TINY_CELL, seed=6).initial["weight"])


def test_syntax_error_is_reported_with_line_before_submission() -> None:
    with pytest.raises(TaskInvalid, match=r"syntax error in the cell at line 2.*Nothing was submitted"):
        prepare("import torch\ndef build_model(:\n")


def test_missing_functions_are_named() -> None:
    with pytest.raises(TaskInvalid, match="does not define train, evaluate"):
        prepare("import torch\ndef build_model():\n    return torch.nn.Linear(1, 1)\n")


def test_build_model_must_return_a_torch_module() -> None:
    source = TINY_CELL.replace("return torch.nn.Linear(3, 1)", "return [1, 2]")
    with pytest.raises(TaskInvalid, match="torch.nn.Module, not list"):
        prepare(source)


def test_a_cell_that_fails_while_it_is_prepared_is_told_as_a_failed_step_with_its_message() -> None:
    source = TINY_CELL.replace("    return torch.nn.Linear(3, 1)", "    return torch.nn.Linear(3, 1 // 0)")
    line = source.splitlines().index("    return torch.nn.Linear(3, 1 // 0)") + 1
    with pytest.raises(TaskInvalid) as raised:
        prepare(source)
    said = f"ZeroDivisionError at cell line {line} in build_model(): integer division or modulo by zero."
    assert str(raised.value) == f"{said} Nothing was submitted."
    with pytest.raises(TaskInvalid, match="NameError at cell line 1 in the cell, while defining its functions"):
        prepare("undefined_name\n" + TINY_CELL)


def test_load_weights_gives_a_model_holding_them() -> None:
    task = prepare(TINY_CELL)
    model = load_weights(task, {"weight": np.ones((1, 3), np.float32), "bias": np.zeros(1, np.float32)})
    assert model.weight.detach().numpy().tolist() == [[1.0, 1.0, 1.0]]


def test_parse_config_reads_numbers_booleans_and_text() -> None:
    assert parse_config(["lr=0.01", "steps=100", "flag=true", "name=abc"]) == {
        "lr": 0.01,
        "steps": 100,
        "flag": True,
        "name": "abc",
    }


def test_the_declared_metric_names_are_the_options_or_those_the_cell_returns() -> None:
    task = prepare(TINY_CELL)
    assert task.metrics == ("loss", "accuracy", "rows")
    assert metrics_to_declare(task, None) == ["loss", "accuracy", "rows"]
    assert metrics_to_declare(task, ["auc"]) == ["auc"]  # --metrics: the researcher's word


@pytest.mark.parametrize(
    ("returned", "said"),
    [
        ("return {}", "found none: name them with --metrics"),
        ("return dict(zip(NAMES, VALUES))", "found none: name them with --metrics"),
        ('return {"val-loss": 1.0}', "returns a metric named 'val-loss'"),
        ("return {" + ", ".join(f'"m{i}": 0' for i in range(21)) + "}", "return 21 metric names: at most 20"),
    ],
)
def test_a_cell_whose_metric_names_cannot_be_declared_is_refused_before_submission(returned: str, said: str) -> None:
    source = TINY_CELL.replace('return {"loss": loss.item()}', returned).replace(
        'return {"accuracy": acc, "rows": len(y)}', "return None"
    )
    with pytest.raises(TaskInvalid, match=said):
        metrics_to_declare(prepare(source), None)
    assert metrics_to_declare(prepare(source), ["loss"]) == ["loss"]
