"""The rules of a cell, as the notebook and the site both apply them."""

from __future__ import annotations

import pytest

from flip_core.cell import (
    CELL_FILENAME,
    cell_line,
    failed_step,
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
