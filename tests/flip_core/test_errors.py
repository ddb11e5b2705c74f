"""FLIP's errors: one root, fields that survive pickling, and no product exception outside the root."""

from __future__ import annotations

import ast
import pickle

import pytest

from flip_core.codec import ModelInvalid
from flip_core.errors import ConfigError, FlipError, NotConnected, Rejected, RequestInvalid, RunFailed, TaskInvalid

from helpers import REPO

ROLES = ("flip_core", "flip_magics", "site_agent", "coordinator", "flip_local")


@pytest.mark.parametrize(
    "error",
    [
        FlipError("plain"),
        ConfigError("site.toml: no [site] table"),
        Rejected("no such run", 404),
        RequestInvalid("the task: field 'rounds' must be a whole number", "rounds", 400),
        NotConnected("no coordinator"),
        TaskInvalid("syntax error"),
        RunFailed("r1", "failed", "VA: TimeLimit"),
        ModelInvalid("not a model"),
    ],
)
def test_an_error_pickles_with_its_fields(error: FlipError) -> None:
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and vars(back) == vars(error)


def test_run_failed_keeps_the_run_and_the_reason() -> None:
    back = pickle.loads(pickle.dumps(RunFailed("r1", "stopped", "stopped by the researcher")))
    assert (back.run_id, back.status, back.reason) == ("r1", "stopped", "stopped by the researcher")
    assert str(back) == "run r1 stopped: stopped by the researcher"


def test_a_request_error_is_a_refusal_with_its_field() -> None:
    error = RequestInvalid("too big", field="body", status=413)
    assert isinstance(error, Rejected) and (error.field, error.status) == ("body", 413)


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    """Every class in the product packages whose bases name an exception, with its bases' names."""
    found = []
    for package in ROLES:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = [ast.unparse(b) for b in node.bases]
                    if any(b.endswith(("Error", "Exception")) or b in ("Rejected", "Refused") for b in bases):
                        found.append((str(path.relative_to(REPO)), node.name, bases))
    return found


def test_every_product_error_descends_from_flip_error() -> None:
    import importlib

    strays = []
    for path, name, _ in _exception_classes():
        if name.startswith("_"):  # a private signal inside one module (a stop request, an upstream that broke)
            continue
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        if not issubclass(getattr(module, name), FlipError):
            strays.append(f"{path}:{name}")
    assert strays == []
    assert len(_exception_classes()) >= 15  # the walk found the classes it is about
