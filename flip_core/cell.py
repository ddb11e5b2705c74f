"""The rules of a ``%%flip_train`` cell, shared by the notebook (which checks a cell before it is
submitted, or runs it on the sites' mocks) and the site (which runs it): the functions it defines,
the source as hashed for approval, how a failure is traced to a line of the cell and told without
revealing its message, the seeds of a step, and FedProx's proximal term.
"""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Mapping
from typing import Any

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
    "failed_step",
    "missing_functions",
    "normalise_source",
    "proximal_term",
    "seed_everything",
    "source_hash",
    "step_seed",
]
