"""The rules of a cell, as the notebook and the site both apply them."""

from __future__ import annotations

import pytest

from flip_core.cell import (
    CELL_FILENAME,
    cell_line,
    declared_metrics,
    failed_step,
    metrics_of,
    missing_functions,
    normalise_source,
    proximal_term,
    source_hash,
)


def test_source_hash_ignores_trailing_space_and_line_endings_only() -> None:
    assert source_hash("a = 1  \r\nb = 2\n\n") == source_hash("a = 1\nb = 2")
    assert source_hash("a = 1\nb = 2") != source_hash("a = 1\nb = 3")
    assert normalise_source("\n\nx = 1   \r\n") == "x = 1\n"


def test_the_failing_line_is_the_innermost_frame_in_the_cell() -> None:
    namespace: dict[str, object] = {}
    exec(
        compile("def inner():\n    return 1 / 0\n\ndef outer():\n    return inner()\n", CELL_FILENAME, "exec"),
        namespace,
    )
    with pytest.raises(ZeroDivisionError) as raised:
        namespace["outer"]()  # type: ignore[operator]
    assert cell_line(raised.value) == 2


def test_a_syntax_error_names_its_line_and_other_code_names_none() -> None:
    with pytest.raises(SyntaxError) as raised:
        compile("x = 1\ny = (\n", CELL_FILENAME, "exec")
    assert cell_line(raised.value) == 2
    assert cell_line(ValueError("not from the cell")) == 0


def test_missing_functions_are_named_in_order_and_non_callables_count_as_missing() -> None:
    assert missing_functions({"build_model": lambda: None, "train": 3}) == ["train", "evaluate"]
    assert missing_functions({n: print for n in ("build_model", "train", "evaluate")}) == []


def test_a_failed_step_is_told_by_its_type_line_and_place_never_its_message() -> None:
    assert failed_step("TypeError", 12, "train()") == "TypeError at cell line 12 in train()"
    assert failed_step("MissingFunction", 0, "train, evaluate") == "MissingFunction in train, evaluate"
    assert failed_step("MemoryLimit", 3, "") == "MemoryLimit at cell line 3"


def test_the_proximal_term_is_half_mu_times_the_squared_distance_to_the_global_model() -> None:
    import numpy as np
    import torch

    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        model.bias.copy_(torch.tensor([0.5]))
    global_params = {"weight": np.array([[0.0, 0.0]], np.float32), "bias": np.array([0.0], np.float32)}
    term = proximal_term(model, global_params, 0.2)
    assert term.item() == pytest.approx(0.1 * (1 + 4 + 0.25))
    term.backward()  # it is part of the loss: its gradient reaches the parameters
    assert model.weight.grad is not None and model.weight.grad[0].tolist() == pytest.approx([0.2, 0.4])
    assert proximal_term(model, global_params, 0.0).item() == 0.0


def test_the_declared_metrics_are_the_keys_train_and_evaluate_return_read_without_running() -> None:
    source = """
import torch
def helper():
    return {"not_a_metric": 1}

def train(model, data, config):
    out = {"loss": 1.0}
    out["dice"] = 2.0
    if config.get("x"):
        return {**out, "num_examples": 3, **({"alpha_only": 1} if data.site == "A" else {})}
    return out

def evaluate(model, data, config):
    raise SystemExit("never run")
    return dict(auc=0.5, accuracy=1.0)
"""
    names = declared_metrics(source)
    assert sorted(names) == ["accuracy", "alpha_only", "auc", "dice", "loss"] and len(set(names)) == len(names)
    assert declared_metrics("def train(:\n") == () and declared_metrics("x = 1\n") == ()


def test_the_names_taken_as_declared_are_the_valid_ones_and_at_most_twenty() -> None:
    many = "def train(m, d, c):\n    return {" + ", ".join(f'"m{i}": 0' for i in range(25)) + ', "bad-name": 1}\n'
    assert metrics_of(many) == tuple(f"m{i}" for i in range(20))
