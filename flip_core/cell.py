"""The rules of a ``%%flip_train`` cell, shared by the notebook (which checks a cell before it is
submitted) and the site (which runs it): the functions it defines, the source as hashed for
approval, and how a failure is traced to a line of the cell without revealing its message.
"""

from __future__ import annotations

import hashlib
import traceback

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


def missing_functions(namespace: dict[str, object]) -> list[str]:
    """The required functions a cell's namespace lacks (or holds as something not callable)."""
    return [name for name in REQUIRED_FUNCTIONS if not callable(namespace.get(name))]


__all__ = [
    "CELL_FILENAME",
    "REQUIRED_FUNCTIONS",
    "SIGNATURES",
    "cell_line",
    "missing_functions",
    "normalise_source",
    "source_hash",
]


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
