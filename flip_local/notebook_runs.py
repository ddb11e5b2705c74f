"""``flip run``, ``flip rerun``: a notebook executed by papermill in the FLIP kernel against the connected
federation, leaving in one folder the executed notebook, its parameters and the record of every federated run
it made; a rerun executes a recorded run's notebook again with the same parameters and compares the metrics.

The kernel learns what it is running from the environment (``flip_magics.provenance``): each task it submits
names the notebook, its hash, the parameters and this execution, and its run id is logged for collection."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flip_core.errors import FlipError
from flip_core.records import Comparison, compare
from flip_core.runs import RunRecord, record_of
from flip_magics.client import FlipClient
from flip_magics.provenance import ENV_NOTEBOOK, ENV_RUN_LOG

FLIP_KERNEL = "flip"  # `flip kernel install`: the magics preloaded


class NotebookFailed(FlipError):
    """A cell of the notebook raised: which one and why, in a sentence."""


@dataclass
class Execution:
    notebook: Path
    out: Path
    execution: str
    sha256: str
    parameters: dict[str, Any]
    runs: list[str] = field(default_factory=list)
    records: dict[str, RunRecord] = field(default_factory=dict)
    unread: dict[str, str] = field(default_factory=dict)  # runs whose record could not be read, and why
    error: str = ""

    @property
    def executed(self) -> Path:
        return self.out / self.notebook.name


def parse_value(text: str) -> Any:
    """A ``-p NAME VALUE`` value as papermill's command line reads it: a number, true/false/none, or text."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _declared(notebook: Path) -> set[str]:
    import papermill

    try:
        return set(papermill.inspect_notebook(str(notebook)))
    except Exception:  # noqa: BLE001 - a notebook without a parameters cell declares nothing
        return set()


@contextmanager
def _environment(values: dict[str, str]) -> Any:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _kernel_name() -> str | None:
    from jupyter_client.kernelspec import KernelSpecManager

    return FLIP_KERNEL if FLIP_KERNEL in KernelSpecManager().find_kernel_specs() else None


def run_notebook(
    notebook: Path, parameters: dict[str, Any], out: Path | None = None, *, client: FlipClient, progress: bool = True
) -> Execution:
    """Execute ``notebook`` with ``parameters``; the executed copy, ``parameters.json``, ``execution.json`` and
    ``records/RUN_ID.json`` land in ``out``. A failing cell raises :class:`NotebookFailed` (the files stay)."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    notebook = notebook.resolve()
    if not notebook.is_file():
        raise NotebookFailed(f"no notebook at {notebook}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = (out or Path("runs") / f"{notebook.stem}-{stamp}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    given = {k: v for k, v in parameters.items() if v is not None}  # what a rerun passes again
    parameters = dict(parameters)
    if "output_dir" in _declared(notebook) and "output_dir" not in parameters:
        parameters["output_dir"] = str(out)  # a notebook that writes files writes them beside its record
    run = Execution(notebook, out, secrets.token_hex(6), _sha256(notebook), parameters)
    log = out / "runs.log"
    log.write_text("")
    info = {"path": str(notebook), "sha256": run.sha256, "parameters": _jsonable(given), "execution": run.execution}
    started = time.time()
    try:
        with _environment({ENV_NOTEBOOK: json.dumps(info), ENV_RUN_LOG: str(log)}):
            papermill.execute_notebook(
                str(notebook),
                str(run.executed),
                parameters=parameters,
                kernel_name=_kernel_name(),
                progress_bar=progress,
                cwd=str(out),
            )
    except PapermillExecutionError as exc:
        first = (exc.source or "").strip().splitlines()[:1]
        run.error = (
            f"cell {exc.cell_index + 1} of {notebook.name} (In [{exc.exec_count}]"
            + (f": {first[0][:80]!r}" if first else "")
            + f") failed: {_reason(run.executed, exc)}"
        )
    finally:
        run.runs = [line for line in log.read_text().split() if line]
        _collect(run, client, started)
    if run.error:
        raise NotebookFailed(run.error + f"; the executed notebook is {run.executed}")
    return run


def _reason(executed: Path, exc: Any) -> str:
    """What the failing cell said: its error, or (a magic's UsageError is printed, not raised as an error output)
    the last line it wrote to stderr."""
    if exc.evalue:
        return f"{exc.ename}: {exc.evalue}"
    try:
        cells = json.loads(executed.read_text())["cells"]
    except (OSError, ValueError, KeyError):  # no executed copy: say what papermill said
        cells = []
    for cell in cells:
        source = "".join(cell.get("source", ""))
        if cell.get("cell_type") == "code" and source == exc.source:
            text = "".join("".join(o.get("text", "")) for o in cell.get("outputs", []) if o.get("name") == "stderr")
            if lines := text.strip().splitlines():
                return lines[-1]
    return str(exc.ename or "an error")


def _collect(run: Execution, client: FlipClient, started: float) -> None:
    records = run.out / "records"
    records.mkdir(exist_ok=True)
    for run_id in run.runs:
        try:
            record = record_of(client.run(run_id))
        except FlipError as exc:  # the run's record stays on the hub; say so rather than fail the whole command
            run.unread[run_id] = str(exc)
            (records / f"{run_id}.json").write_text(json.dumps({"run_id": run_id, "error": str(exc)}, indent=2))
            continue
        run.records[run_id] = record
        (records / f"{run_id}.json").write_text(json.dumps(record.as_dict(), indent=2))
    (run.out / "parameters.json").write_text(json.dumps(_jsonable(run.parameters), indent=2))
    summary = {
        "execution": run.execution,
        "notebook": str(run.notebook),
        "notebook_sha256": run.sha256,
        "parameters": _jsonable(run.parameters),
        "runs": run.runs,
        "started": started,
        "finished": time.time(),
        "status": "failed" if run.error else "completed",
        "error": run.error,
        "executed_notebook": str(run.executed),
    }
    (run.out / "execution.json").write_text(json.dumps(summary, indent=2))


def rerun(
    run_id: str, overrides: dict[str, Any], out: Path | None = None, *, client: FlipClient, progress: bool = True
) -> tuple[Comparison, Execution]:
    """Execute the notebook that made ``run_id`` again with its parameters (``overrides`` changed), and compare
    the matching new run (the same place among the execution's tasks) with the old one."""
    old = record_of(client.run(run_id))
    notebook = old.notebook
    if notebook is None or not notebook.path:
        raise NotebookFailed(
            f"run {run_id} was not made by `flip run` (its record names no notebook): run its notebook with "
            "`flip run NOTEBOOK` to make a run that can be rerun"
        )
    path = Path(notebook.path)
    if not path.is_file():
        raise NotebookFailed(f"run {run_id}'s notebook {path} is not there any more")
    execution = run_notebook(path, {**notebook.parameters, **overrides}, out, client=client, progress=progress)
    cell = notebook.cell or 1
    if len(execution.runs) < cell:
        raise NotebookFailed(
            f"the rerun made {len(execution.runs)} federated run(s), so there is no run {cell} to set beside {run_id}"
        )
    new_id = execution.runs[cell - 1]
    if new_id not in execution.records:
        raise NotebookFailed(f"the record of run {new_id}, the rerun, could not be read: {execution.unread[new_id]}")
    new = execution.records[new_id]
    comparison = compare(old, new)
    (execution.out / "comparison.json").write_text(
        json.dumps({"identical": comparison.identical, "same_model": comparison.same_model,
                    "changes": comparison.changes, "notes": comparison.notes, "rows": comparison.rows}, indent=2)
    )  # fmt: skip
    return comparison, execution


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonable(parameters: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v) for k, v in parameters.items()}


__all__ = ["Execution", "NotebookFailed", "parse_value", "rerun", "run_notebook"]
