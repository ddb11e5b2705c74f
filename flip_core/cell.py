"""The rules of a ``%%flip_train`` cell, shared by the notebook (which checks a cell before it is
submitted, or runs it on the sites' mocks) and the site (which runs it): the functions it defines,
the source as hashed for approval, the metric names it declares (read from its source, never run), how a failure
is traced to a line of the cell and told without revealing its message (in the words of ``flip_core.vocabulary``),
the seeds of a step, and FedProx's proximal term.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

from flip_core.vocabulary import MAX_METRICS, WEIGHT_KEY, is_metric_name

CELL_FILENAME = "<flip-cell>"  # the cell is compiled under this name, so its frames can be found
REQUIRED_FUNCTIONS = ("build_model", "train", "evaluate")
SIGNATURES = "build_model(), train(model, data, config) -> dict and evaluate(model, data, config) -> dict"


def normalise_source(source: str) -> str:
    """The cell source as hashed for approval: LF endings, no trailing spaces or blank edges."""
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def source_hash(source: str) -> str:
    """What a site admin approves: ``sha256:`` and the digest of the normalised source."""
    return "sha256:" + hashlib.sha256(normalise_source(source).encode()).hexdigest()


def task_hash(source: str, covariates: dict[str, Any] | None = None) -> str:
    """What a site admin approves of a task: its cell's :func:`source_hash`, or, when it declares a covariate
    specification (``flip_core.covariates``), the digest of the normalised source and the specification's canonical
    text together (either changed is another task). ValueError when the specification is not one."""
    if covariates is None:
        return source_hash(source)
    from flip_core.covariates import canonical, read_covariates

    body = normalise_source(source) + "\0covariates\0" + canonical(read_covariates(covariates))
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


def cell_line(exc: BaseException) -> int:
    """The line of the cell where ``exc`` arose: its innermost frame in the cell (0 when none is)."""
    line = 0
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == CELL_FILENAME and frame.lineno:
            line = frame.lineno
    if isinstance(exc, SyntaxError) and exc.filename == CELL_FILENAME and exc.lineno:
        line = exc.lineno
    return line


def failed_step(error_type: str, line: int, where: str) -> str:
    """The sentence for a step of the cell that failed, as the hub, the mock run and the kernel tell it: the
    exception's type, the cell's line (when one is known) and where it ran (``"TypeError at cell line 12 in
    train()"``). The exception's message is not in it: at a site it could hold data."""
    at_line = f" at cell line {line}" if line else ""
    in_where = f" in {where}" if where else ""
    return f"{error_type}{at_line}{in_where}"


def declared_metrics(source: str) -> tuple[str, ...]:
    """The metric names a cell's ``train()`` and ``evaluate()`` return, read from its source without running it
    (``ast``): the string keys of the dict literals (and ``dict(name=...)``) in what they return, and of a variable
    they return, where it is assigned a dict literal or a key (``out["auc"] = ...``). In the order found, each once,
    ``num_examples`` (the update's weight) left out; () when the source does not parse. A name found here may still
    break the rules of a metric's name (``flip_core.vocabulary.METRIC_NAME``): the caller says so."""
    return _declared_metrics(source)


def metrics_of(source: str) -> tuple[str, ...]:
    """The metric names a task declares when none were given with it (the hub, a site): those
    :func:`declared_metrics` reads that are metric names, the first ``MAX_METRICS`` of them."""
    return tuple(n for n in declared_metrics(source) if is_metric_name(n))[:MAX_METRICS]


@functools.lru_cache(maxsize=32)  # a site reads a run's source at each of its steps
def _declared_metrics(source: str) -> tuple[str, ...]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ()
    found: dict[str, None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in ("train", "evaluate"):
            found.update(dict.fromkeys(_returned_keys(node)))
    found.pop(WEIGHT_KEY, None)
    return tuple(found)


def _returned_keys(function: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[str]:
    returned: set[str] = set()
    for node in ast.walk(function):
        if isinstance(node, ast.Return) and node.value is not None:
            yield from _literal_keys(node.value)
            if isinstance(node.value, ast.Name):
                returned.add(node.value.id)
    for node in ast.walk(function):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id in returned:
                    yield from _literal_keys(node.value)
                elif (
                    isinstance(target, ast.Subscript)
                    and isinstance(target.value, ast.Name)
                    and target.value.id in returned
                    and isinstance(target.slice, ast.Constant)
                    and isinstance(target.slice.value, str)
                ):
                    yield target.slice.value


def _literal_keys(expression: ast.expr) -> Iterator[str]:
    for node in ast.walk(expression):
        if isinstance(node, ast.Dict):
            yield from (k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            yield from (k.arg for k in node.keywords if k.arg is not None)


def missing_functions(namespace: dict[str, object]) -> list[str]:
    """The required functions a cell's namespace lacks (or holds as something not callable)."""
    return [name for name in REQUIRED_FUNCTIONS if not callable(namespace.get(name))]


def step_seed(seed: int, round_: int, site: str) -> int:
    """The seed of one step of a run at one site (the run's seed, the round and the site, hashed)."""
    digest = hashlib.sha256(f"{seed}:{round_}:{site}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators before a step (torch is imported here, when it is used)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def proximal_term(model: Any, global_params: Mapping[str, Any], mu: float) -> Any:
    """FedProx's ``mu/2 * ||w - w_global||^2`` for ``model``'s parameters against the round's global ones, as a
    torch scalar the cell adds to its loss (0 when ``mu`` is 0; torch is imported here, when it is used)."""
    import torch

    if not mu:
        return torch.zeros(())
    total = torch.zeros(())
    for name, param in model.named_parameters():
        if name in global_params:
            ref = torch.as_tensor(global_params[name], dtype=param.dtype, device=param.device)
            total = total + ((param - ref) ** 2).sum()
    return 0.5 * mu * total


__all__ = [
    "CELL_FILENAME",
    "REQUIRED_FUNCTIONS",
    "SIGNATURES",
    "cell_line",
    "declared_metrics",
    "failed_step",
    "metrics_of",
    "missing_functions",
    "normalise_source",
    "proximal_term",
    "seed_everything",
    "source_hash",
    "step_seed",
]
