"""One task process as the site agent holds it (:class:`Worker`): started with its site, its channel, its scratch
and file sizes and its cgroup (:func:`worker_arguments`), in an environment of its own settings only
(:func:`task_environment`); its output copied to the site's log under the step's limit; adopted once by a run
(handed what the run was approved for); each step sent and its result read under a cap and by a deadline; killed
with whatever it started. The task service (``site_agent.tasks.service``) decides which process serves which run.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from flip_core.errors import FlipError
from site_agent.governance.policy import TaskLimits
from site_agent.sandbox import handed
from site_agent.sandbox.cgroups import TaskGroup
from site_agent.tasks.adoption import Adoption, binding
from site_agent.tasks.messages import (
    ADOPT,
    READY,
    STEP,
    Overdue,
    Oversized,
    receive_message,
    receive_sized,
    result_cap,
    send_sized,
)
from site_agent.tasks.output import LogLimit, TaskOutput
from site_agent.tasks.zygote import Forked, Zygote

log = logging.getLogger("flip.site.tasks")

DEFAULT_LIMITS = TaskLimits()


class TimeLimit(FlipError):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"stopped at its time limit of {seconds:g} s")
        self.seconds = seconds


# what of the agent's environment a task process gets: its own settings, locale, thread counts, Python's
# (a token or a path in the agent's environment stays with the agent)
TASK_ENV_PREFIXES = ("FLIP_TASK_", "LC_", "OMP_", "MKL_", "OPENBLAS_", "PYTHON")
TASK_ENV_NAMES = ("PATH", "LANG", "TZ")


def task_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k in TASK_ENV_NAMES or k.startswith(TASK_ENV_PREFIXES)}


def worker_arguments(
    site_root: Path, fd: int, limits: TaskLimits, keep_scratch: bool, group: TaskGroup | None = None
) -> list[str]:
    """The command line of a task process: its site, its channel, the sizes of its scratch (a tmpfs; none where the
    admin keeps runs' scratch folders to read them) and of any file it writes, its cgroup where it has one."""
    scratch = [] if keep_scratch else ["--scratch-mb", str(limits.scratch_limit_mb)]
    cgroup = [] if group is None else [arg for path in group.paths for arg in ("--cgroup", str(path))]
    return [sys.executable, "-m", "site_agent.tasks.worker", str(site_root), "--fd", str(fd), *scratch,
            "--file-mb", str(limits.file_limit_mb), *cgroup]  # fmt: skip


class Worker:
    """One warm task process and the connection to it."""

    def __init__(
        self,
        site_root: Path,
        limits: TaskLimits = DEFAULT_LIMITS,
        on_cut: Callable[[str], None] | None = None,
        *,
        keep_scratch: bool = False,
        bind: tuple[Path, ...] = (),
        group: TaskGroup | None = None,
        zygote: Zygote | None = None,
    ) -> None:
        """``group``: its own cgroup (it moves itself in first), where the host gives the agent cgroups; ``zygote``:
        the site's loaded process to fork it from, where it runs (else it starts as a new Python)."""
        ours, theirs = socket.socketpair()
        self.group = group
        bound, listed = binding(bind)  # the files of the one run it is started for (an imaging run's); a spare: none
        for folder in ("logs", "scratch"):
            (site_root / folder).mkdir(parents=True, exist_ok=True)
        self.logs = site_root / "logs"
        argv = worker_arguments(site_root, theirs.fileno(), limits, keep_scratch, group) + bound
        self.process: subprocess.Popen[bytes] | Forked
        self.process = self._start(argv, [theirs.fileno(), *listed], site_root, zygote)
        theirs.close()
        for fd in listed:  # the list of its files, read by the process before its sandbox
            os.close(fd)
        log_limit = LogLimit(limits.log_limit_lines, int(limits.log_limit_mb * 2**20))
        self.output = TaskOutput(self.logs / "task-processes.log", log_limit, on_cut)
        assert self.process.stdout is not None
        threading.Thread(target=self.output.copy, args=(self.process.stdout,), name="task-output", daemon=True).start()
        self.conn = Connection(ours.detach())
        self.lock = threading.Lock()
        self.last_used = time.monotonic()  # when a step last started or ended here
        self.steps_running = 0  # counted by the service, under its lock (the reaper reads it there)
        self.ready = False

    @staticmethod
    def _start(
        argv: list[str], fds: list[int], site_root: Path, zygote: Zygote | None
    ) -> subprocess.Popen[bytes] | Forked:
        if zygote is not None and zygote.alive():
            try:
                return zygote.spawn(argv, fds, site_root / "scratch")
            except OSError as exc:
                log.warning("the zygote could not fork a task process (%s): starting one anew", exc)
        return subprocess.Popen(
            argv,
            pass_fds=fds,
            env=task_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=site_root / "scratch",  # also its sys.path[0]: nothing else of the agent's folder
        )  # no PDEATHSIG here: it fires when the spawning *thread* ends; the worker watches its parent

    def _await_ready(self) -> None:
        """The process says "ready" once torch is loaded (called with the lock held)."""
        if not self.ready:
            if self.conn.recv_bytes() != READY:
                raise OSError("the task process did not start properly")
            self.ready = True

    def wait_ready(self) -> None:
        with self.lock:
            self._await_ready()

    def adopt(self, run_id: str, scratch: Path, memory_mb: int | None, run: Adoption) -> None:
        """Make this the task process of ``run_id``, once, before its first step: its log, its scratch folder, its
        memory limit, and what the run was approved for (``run``: its rows only, handed sealed in memory)."""
        with self.lock:
            self._await_ready()
            self.output.switch(self.logs / f"run-{run_id}.log", run_id)
            settings = {"run_id": run_id, "scratch": str(scratch), "memory_mb": memory_mb, **run.settings()}
            self.conn.send_bytes(ADOPT + json.dumps(settings).encode())
            handed.send(self.conn, run.handed.payload, self.process.pid, f"flip-run-{run_id}")
            if self.conn.recv_bytes() != READY:
                raise OSError("the task process did not take its run")

    def call(self, blob: bytes | bytearray, seconds: float | None = None, cap: int | None = None) -> bytearray:
        """Run one step; its result read under ``cap`` bytes (else the task process is killed and :class:`Oversized`
        raised, before anything is allocated) by ``seconds`` (else killed and :class:`TimeLimit` raised)."""
        with self.lock:
            self._await_ready()
            self.output.begin_step()
            deadline = None if seconds is None else time.monotonic() + seconds
            limit = result_cap(blob) if cap is None else cap
            try:
                send_sized(self.conn, blob, deadline)
                told = receive_message(self.conn, limit, deadline)
                if not told.startswith(STEP):  # not the worker's framing (task code writing to the channel itself):
                    return told  # handed on as the result, which the output guard refuses unless it is one
                return receive_sized(self.conn, told, limit, deadline)
            except Overdue:
                self.kill()
                raise TimeLimit(seconds or 0.0) from None
            except Oversized:
                self.kill()
                raise

    def kill(self) -> None:
        """SIGKILL the task process and whatever it started (its own session; the sandboxed child dies with it)."""
        if isinstance(self.process, Forked):
            self.process.kill_group()
        else:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self._ungroup()

    def close(self) -> None:
        self.conn.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._ungroup()

    def _ungroup(self) -> None:
        if self.group is not None:
            self.group.remove()
