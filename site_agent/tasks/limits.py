"""A site's limits on its task processes as the agent keeps them (``[policy]``, ``governance.policy.TaskLimits``):
the one sentence the researcher gets for each limit that stops a step, the note for the one that does not (a step's
output cut in the site's log), the audit record of each limit reached, and the reaper's rule.

The sentences are fixed text: the site's name, the limit and its setting; never a number or a word of the task's.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from site_agent.governance.audit import AuditLog
from site_agent.governance.policy import TaskLimits
from site_agent.sandbox import process_limit
from site_agent.tasks.messages import result_cap

log = logging.getLogger(__name__)

IDLE_SECONDS = 600.0  # a task process no step has used this long is closed (never while a step runs in it)
# the failures of a step that mean a site limit was reached there, as the task process names them
# (site_agent.tasks.runner) or the agent does, and the limit each is in the audit log
LIMITS = {
    "ResultLimit": "result",
    "ScratchLimit": "scratch",
    "FileSizeLimit": "file_size",
    "ProcessLimit": "processes",
    "MemoryLimit": "memory",
    "TimeLimit": "time",
    "RunLimit": "runs",
}


def idle_too_long(now: float, last_used: float, steps_running: int, idle_seconds: float = IDLE_SECONDS) -> bool:
    """Whether the reaper closes a task process: only when no step is running in it (a step stops at its own time
    limit, the project's, however long that is) and none has started or ended for ``idle_seconds``."""
    return steps_running == 0 and now - last_used > idle_seconds


class SiteLimits:
    """One site's limits on its task processes: what is said of each, and the audit record of each reached."""

    def __init__(self, site: str, site_root: Path, limits: TaskLimits) -> None:
        self.site = site
        self.limits = limits
        self.audit = AuditLog(site_root)  # the limits reached (the governance writes decisions and outcomes)
        self._notes: dict[str, str] = {}  # per run: a limit its last step reached without failing
        self._lock = threading.Lock()

    @property
    def failures(self) -> dict[str, tuple[str, ...]]:
        """The sentence the researcher gets for each of this site's limits that stops a step (the one a result
        naming it may say: ``site_agent.disclosure.guard.Known.failures``)."""
        site, limits = self.site, self.limits
        result = (
            "the step's own size and 1 MiB" if limits.result_limit_mb is None else f"{limits.result_limit_mb:g} MiB"
        )
        return {
            "ResultLimit": (f"the task process (its result passed {site}'s limit on a step's result: {result})",),
            "ScratchLimit": (
                f"the task process (it filled the room {site} gives a run to write: {limits.scratch_limit_mb} MiB)",
            ),
            "FileSizeLimit": (
                f"the task process (a file it wrote reached {site}'s limit of {limits.file_limit_mb} MiB a file)",
            ),
            "ProcessLimit": (
                f"the task process (it reached {site}'s limit of {process_limit()} processes and threads a run)",
            ),
            # where the run's processes have a cgroup: the kernel ended one at the run's memory, all counted together
            "MemoryLimit": (f"the task process (its processes together passed {site}'s memory limit for a run)",),
            "RunLimit": (f"the site agent ({site} runs at most {limits.runs_limit} runs at once: not this one now)",),
        }

    def cap(self, step: bytes | bytearray) -> int:
        """The most a result of ``step`` may hold here (bytes)."""
        megabytes = self.limits.result_limit_mb
        return result_cap(step, None if megabytes is None else int(megabytes * 2**20))

    def reached(self, run_id: str, limit: str, setting: Any = None, phase: str = "", round_: Any = None) -> None:
        """The audit record of a limit reached (what the researcher is told is the result's, or a note)."""
        self.audit.append("limit", run=run_id or None, limit=limit, setting=setting, phase=phase, round=round_)

    def log_cut(self, run_id: str) -> None:
        """A step's output passed the site's log limit (told by the thread that copies it)."""
        limits = self.limits
        log.warning("run %s: a step's output passed the site's log limit: the rest of it was not kept", run_id)
        self.reached(run_id, "log", {"lines": limits.log_limit_lines, "mb": limits.log_limit_mb})
        if run_id:
            with self._lock:
                self._notes[run_id] = (
                    f"{self.site} kept only the first {limits.log_limit_lines} lines or "
                    f"{limits.log_limit_mb:g} MiB of the step's output in its log"
                )

    def notes(self, run_id: str) -> tuple[str, ...]:
        """What the researcher is told of a limit ``run_id``'s last step reached here without failing, once."""
        with self._lock:
            note = self._notes.pop(run_id, "")
        return (note,) if note else ()
