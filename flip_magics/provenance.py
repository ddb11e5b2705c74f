"""What a task carries of where it came from: the notebook ``flip run`` is executing (its path, hash, parameters
and execution), the kernel's packages, and the log of the runs an execution made (``flip run`` collects their
records from it). ``flip run`` passes these to the kernel it starts through the environment; outside it there
is no notebook to name and nothing is logged."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

from flip_core.versions import RECORDED_PACKAGES, environment_hash, package_versions

ENV_NOTEBOOK = "FLIP_NOTEBOOK"  # JSON: {"path", "sha256", "parameters", "execution"} of the executing notebook
ENV_RUN_LOG = "FLIP_RUN_LOG"  # a file the kernel appends each submitted run's id to, one per line

_cells = itertools.count(1)


def task_provenance() -> dict[str, Any]:
    """The fields of a ``TaskSpec`` that say where a task came from (its notebook only under ``flip run``)."""
    fields: dict[str, Any] = {
        "client_packages": package_versions(*RECORDED_PACKAGES),
        "client_environment": environment_hash(),
    }
    if text := os.environ.get(ENV_NOTEBOOK):
        notebook = json.loads(text)
        fields["notebook"] = {**notebook, "cell": next(_cells)}  # the execution's 1st, 2nd, ... task
    return fields


def log_run(run_id: str) -> None:
    """Note a submitted run for ``flip run`` (nothing outside it)."""
    if path := os.environ.get(ENV_RUN_LOG):
        with Path(path).open("a", encoding="utf-8") as fh:
            fh.write(run_id + "\n")


__all__ = ["ENV_NOTEBOOK", "ENV_RUN_LOG", "log_run", "task_provenance"]
