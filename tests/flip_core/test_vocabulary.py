"""The words a step's result is built from (``flip_core.vocabulary``): what a failure may be called, and a metric's
name, as the site, the task process, the kernel and the hub all read them."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from flip_core.api import TaskSpec, parse
from flip_core.errors import RequestInvalid
from flip_core.vocabulary import (
    BUILTIN_EXCEPTIONS,
    CELL_FAILURES,
    EXCEPTION_NAMES,
    MAX_METRICS,
    OTHER_EXCEPTION,
    PHASES,
    UNKNOWN_PHASE,
    exception_name,
    is_metric_name,
    told_exception,
    told_line,
    told_phase,
    undeclared,
)


def test_the_allowlist_is_pythons_builtin_exceptions_by_their_own_names_and_a_few_of_the_libraries() -> None:
    assert {"ValueError", "KeyError", "ZeroDivisionError", "PermissionError", "ModuleNotFoundError"} <= EXCEPTION_NAMES
    assert {"OutOfMemoryError", "LinAlgError", "AxisError", "OptionalImportError", "MemoryLimit"} <= EXCEPTION_NAMES
    assert "IOError" not in BUILTIN_EXCEPTIONS and "EnvironmentError" not in BUILTIN_EXCEPTIONS  # aliases of OSError
    assert all(issubclass(getattr(builtins, name), BaseException) for name in BUILTIN_EXCEPTIONS)


def test_an_exception_is_named_by_its_nearest_standard_ancestor_and_a_lookalike_is_not_one() -> None:
    class Oops(KeyError):
        pass

    counted = type("LEAK42", (Exception,), {})
    lookalike = type("ValueError", (ArithmeticError,), {"__module__": "LEAK42", "__qualname__": "LEAK42"})
    dotted = type("ValueError.LEAK42", (ValueError,), {})
    assert exception_name(ValueError("patient 63")) == "ValueError"
    assert exception_name(Oops()) == "KeyError"
    assert exception_name(counted()) == OTHER_EXCEPTION == "Exception"
    assert exception_name(lookalike()) == "ArithmeticError"  # named ValueError, but not builtins.ValueError
    assert exception_name(dotted()) == "ValueError"
    assert exception_name(np.linalg.LinAlgError()) == "LinAlgError"


def test_the_torch_out_of_memory_error_is_named_as_the_library_names_it() -> None:
    torch = pytest.importorskip("torch")
    assert exception_name(torch.OutOfMemoryError("CUDA out of memory")) == "OutOfMemoryError"
    fake = type("OutOfMemoryError", (RuntimeError,), {"__module__": "LEAK42"})
    assert exception_name(fake()) == "RuntimeError"


@pytest.mark.parametrize(
    ("claim", "told"),
    [("ValueError", "ValueError"), ("LEAK42", "Exception"), ("ValueError.LEAK42", "Exception"), (42, "Exception")],
)
def test_a_claimed_type_outside_the_vocabulary_is_told_as_exception(claim: object, told: str) -> None:
    assert told_exception(claim) == told


def test_a_claimed_phase_is_one_of_the_fixed_places_and_a_line_one_of_the_cells() -> None:
    assert [told_phase(p) for p in PHASES] == list(PHASES)
    assert told_phase("train() (LEAK42)") == told_phase(None) == UNKNOWN_PHASE
    assert (told_line(12, 40), told_line(41, 40), told_line(0, 40), told_line(True, 40), told_line("3", 40)) == (
        12,
        0,
        0,
        0,
        0,
    )


def test_flips_own_failures_have_fixed_sentences_holding_no_number() -> None:
    assert "train, evaluate" in CELL_FAILURES["MissingFunction"] and len(CELL_FAILURES["MissingFunction"]) == 7
    assert not any(ch.isdigit() for sentences in CELL_FAILURES.values() for s in sentences for ch in s)
    assert not any(ch.isdigit() for ch in undeclared("train"))


@pytest.mark.parametrize("name", ["loss", "accuracy", "val_F1", "auc2", "a" * 32])
def test_a_metric_name_is_a_short_identifier(name: str) -> None:
    assert is_metric_name(name)
    assert parse(TaskSpec, {"source": "x", "dataset": "d", "metrics": [name]}, "the task").metrics == [name]


@pytest.mark.parametrize(
    ("names", "said"),
    [
        (["a" * 33], "is not a metric name"),
        (["_loss"], "is not a metric name"),
        (["val-loss"], "is not a metric name"),
        (["loss", "loss"], "names a metric twice"),
        ([f"m{i}" for i in range(MAX_METRICS + 1)], f"at most {MAX_METRICS}"),
    ],
)
def test_a_task_refuses_declared_names_that_break_the_rules(names: list[str], said: str) -> None:
    with pytest.raises(RequestInvalid, match=said):
        parse(TaskSpec, {"source": "x", "dataset": "d", "metrics": names}, "the task")
