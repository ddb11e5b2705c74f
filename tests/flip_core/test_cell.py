"""The rules of a cell, as the notebook and the site both apply them."""

from __future__ import annotations

import pytest

from flip_core.cell import CELL_FILENAME, cell_line, missing_functions, normalise_source, source_hash


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
