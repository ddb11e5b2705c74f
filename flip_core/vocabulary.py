"""What a step's result may say, word for word: the words a site builds a result from, shared by the site (which
rebuilds every result from them, ``site_agent.disclosure.guard``), the task process (which names its failures in
them), the notebook (which declares its metric names by them) and the tests.

A failed step is told by a phase from :data:`PHASES`, an exception type from :data:`EXCEPTION_NAMES` (Python's
built-in exception classes by name and :data:`LIBRARY_EXCEPTIONS`; any other type is :data:`OTHER_EXCEPTION`) or one
of FLIP's own failures (:data:`CELL_FAILURES`, each with its fixed sentences), and a line of the cell; never its
message. Metrics are told by names declared before the run (:data:`METRIC_NAME`, at most :data:`MAX_METRICS`).
Every choice among these words is a few bits a hostile cell can choose; the README's site-admin section says which
numbers remain and what bounds them.
"""

from __future__ import annotations

import builtins
import re
from itertools import combinations

# where a cell's own code was running when it failed (``flip_core.cell.failed_step``'s "in ..."); UNKNOWN_PHASE when
# the task process named no phase of these
PHASES = ("the cell", "build_model()", "train()", "evaluate()")
UNKNOWN_PHASE = "the task"

# Python's built-in exception classes, by the name each is defined under (not the aliases IOError, EnvironmentError)
BUILTIN_EXCEPTIONS = frozenset(
    name
    for name, value in vars(builtins).items()
    if isinstance(value, type) and issubclass(value, BaseException) and value.__name__ == name
)
# a short list of the libraries' own, by name and the package that defines it: what a cell's failure commonly is
LIBRARY_EXCEPTIONS = {
    "OutOfMemoryError": "torch",  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError): the GPU's memory is full
    "LinAlgError": "numpy",  # numpy.linalg.LinAlgError: a singular matrix, no convergence
    "AxisError": "numpy",  # numpy.exceptions.AxisError: an axis out of range
    "OptionalImportError": "monai",  # monai.utils.OptionalImportError: MONAI lacks an optional package
}
MEMORY_LIMIT = "MemoryLimit"  # the task process ran out of the site's memory limit (a phase and a line, as an error)
EXCEPTION_NAMES = BUILTIN_EXCEPTIONS | frozenset(LIBRARY_EXCEPTIONS) | {MEMORY_LIMIT}
OTHER_EXCEPTION = "Exception"  # what any other exception type (a cell's own class, a library's) is reported as

# FLIP's own failures of a cell that the task process reports, each with the only sentences its "where" may be
# (its line is 0): the site keeps a claimed sentence only when it is one of these, else it says the first
CELL_FAILURES: dict[str, tuple[str, ...]] = {
    "MissingFunction": tuple(
        ", ".join(names)
        for size in (1, 2, 3)
        for names in combinations(("build_model", "train", "evaluate"), size)  # the required functions it lacks
    ),
    "BadReturn": ("train() (must return a dict of numbers)", "evaluate() (must return a dict of numbers)"),
    "BadMetric": ("train() (a metric is not a number)", "evaluate() (a metric is not a number)"),
    "ModelMismatch": (
        "build_model() (parameter names differ from the global model)",
        "build_model() (a parameter's shape differs from the global model)",
    ),
}

# a metric's name: declared before the run (the kernel reads it from the cell, or --metrics gives it)
MAX_METRIC_CHARS = 32
METRIC_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_]{{0,{MAX_METRIC_CHARS - 1}}}")
MAX_METRICS = 20  # names a task may declare, and metrics of a kind that may leave a site in one step
WEIGHT_KEY = "num_examples"  # what train() may return beside its metrics: the rows its update is weighed by
METRIC_RULE = f"a letter, then letters, digits or '_', at most {MAX_METRIC_CHARS} characters"


def exception_name(exc: BaseException) -> str:
    """The name ``exc``'s type is told by: the nearest class in its type's ancestry that is one of Python's built-in
    exceptions itself or one of :data:`LIBRARY_EXCEPTIONS` (a cell's ``class Oops(KeyError)`` is told as
    ``KeyError``), else :data:`OTHER_EXCEPTION`. A class only named like one is not it."""
    for cls in type(exc).__mro__:
        name = cls.__name__
        if name in BUILTIN_EXCEPTIONS and getattr(builtins, name, None) is cls:
            return name
        if LIBRARY_EXCEPTIONS.get(name) == str(getattr(cls, "__module__", "")).split(".")[0]:
            return name
    return OTHER_EXCEPTION


def told_exception(name: object) -> str:
    """A claimed exception type as a site tells it: itself when it is in the vocabulary, else
    :data:`OTHER_EXCEPTION`."""
    return name if isinstance(name, str) and name in EXCEPTION_NAMES else OTHER_EXCEPTION


def told_phase(where: object) -> str:
    """A claimed phase as a site tells it: itself when it is one of :data:`PHASES`, else :data:`UNKNOWN_PHASE`."""
    return where if isinstance(where, str) and where in PHASES else UNKNOWN_PHASE


def told_line(line: object, lines: int) -> int:
    """A claimed line of a cell of ``lines`` lines: itself when it is one of them, else 0 (none)."""
    if isinstance(line, int) and not isinstance(line, bool) and 1 <= line <= lines:
        return line
    return 0


def is_metric_name(name: object) -> bool:
    return isinstance(name, str) and METRIC_NAME.fullmatch(name) is not None


def undeclared(kind: str) -> str:
    """The sentence a site (and the mock run) says when a step returned ``kind`` metrics its task did not declare:
    fixed text, neither their names nor how many."""
    return f"{kind} metrics withheld: not declared when the run was submitted (declare them with --metrics)"


__all__ = [
    "BUILTIN_EXCEPTIONS",
    "CELL_FAILURES",
    "EXCEPTION_NAMES",
    "LIBRARY_EXCEPTIONS",
    "MAX_METRICS",
    "MAX_METRIC_CHARS",
    "MEMORY_LIMIT",
    "METRIC_NAME",
    "METRIC_RULE",
    "OTHER_EXCEPTION",
    "PHASES",
    "UNKNOWN_PHASE",
    "WEIGHT_KEY",
    "exception_name",
    "is_metric_name",
    "told_exception",
    "told_line",
    "told_phase",
    "undeclared",
]
