"""Turn a ``%%flip_train`` cell into a task, in the researcher's own kernel, before submitting.

The cell is compiled and executed in a scratch namespace (never the user's), its three
functions are checked, and ``build_model()`` gives the initial weights (seeded). A syntax
error, a missing function or a failing ``build_model()`` is reported here, so nothing
broken is ever submitted. The metric names ``train()`` and ``evaluate()`` return are read from the
dict literals they return (``flip_core.cell.declared_metrics``, never run): declared with the task,
they are the only names a site lets leave.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_core.cell import (
    CELL_FILENAME,
    SIGNATURES,
    cell_line,
    declared_metrics,
    failed_step,
    missing_functions,
    source_hash,
)
from flip_core.errors import TaskInvalid
from flip_core.vocabulary import MAX_METRICS, METRIC_RULE, is_metric_name


@dataclass
class PreparedTask:
    source: str
    source_hash: str
    namespace: dict[str, Any]
    initial: dict[str, np.ndarray]
    metrics: tuple[str, ...] = ()  # the names read from its train() and evaluate() dict literals (not yet checked)

    def build_model(self) -> Any:
        return self.namespace["build_model"]()


def prepare(source: str, seed: int = 0) -> PreparedTask:
    """Check the cell and build its initial model; raise :class:`TaskInvalid` with a sentence."""
    try:
        code = compile(source, CELL_FILENAME, "exec")
    except SyntaxError as exc:
        raise TaskInvalid(f"syntax error in the cell at line {exc.lineno}: {exc.msg}. Nothing was submitted.") from None
    namespace: dict[str, Any] = {"__name__": "__flip_task__"}
    try:
        exec(code, namespace)  # noqa: S102 - the researcher's own cell, in their own kernel
    except Exception as exc:  # noqa: BLE001
        failed = failed_step(type(exc).__name__, cell_line(exc), "the cell")
        raise TaskInvalid(f"{failed}, while defining its functions: {exc}. Nothing was submitted.") from None
    if missing := missing_functions(namespace):
        raise TaskInvalid(
            f"the cell does not define {', '.join(missing)}; a %%flip_train cell defines {SIGNATURES}. "
            "Nothing was submitted."
        )
    import torch

    torch.manual_seed(seed)
    try:
        model = namespace["build_model"]()
    except Exception as exc:  # noqa: BLE001
        failed = failed_step(type(exc).__name__, cell_line(exc), "build_model()")
        raise TaskInvalid(f"{failed}: {exc}. Nothing was submitted.") from None
    if not isinstance(model, torch.nn.Module):
        raise TaskInvalid(f"build_model() must return a torch.nn.Module, not {type(model).__name__}")
    initial = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return PreparedTask(source, source_hash(source), namespace, initial, declared_metrics(source))


def metrics_to_declare(task: PreparedTask, given: list[str] | None) -> list[str]:
    """The metric names a task declares: ``given`` (``--metrics``) when given, else those read from the cell; a name
    read that is not a metric's, too many, or none at all is refused in a sentence (:class:`TaskInvalid`): a site
    lets no undeclared name leave."""
    if given is not None:
        return list(given)
    names = task.metrics
    if bad := [n for n in names if not is_metric_name(n)]:
        raise TaskInvalid(
            f"train() or evaluate() returns a metric named {bad[0][:70]!r}: a metric's name is {METRIC_RULE}. "
            "Nothing was submitted."
        )
    if len(names) > MAX_METRICS:
        raise TaskInvalid(
            f"train() and evaluate() return {len(names)} metric names: at most {MAX_METRICS} may leave a site. "
            "Nothing was submitted."
        )
    if not names:
        raise TaskInvalid(
            "FLIP reads the metric names a cell sends from the dict literals its train() and evaluate() return "
            '(return {"loss": ...}) and found none: name them with --metrics, e.g. --metrics loss,accuracy '
            '(FlipClient.train(..., metrics=["loss", "accuracy"])). Nothing was submitted.'
        )
    return list(names)


def load_weights(task: PreparedTask, params: dict[str, np.ndarray]) -> Any:
    """A fresh model from the cell's ``build_model()`` holding ``params``."""
    import torch

    model = task.build_model()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in params.items()})
    return model
