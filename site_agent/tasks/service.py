"""The site agent's task service: one warm task process per run.

The agent hands each step (the bytes of ``flip_core.protocol``) to the run's task process
(``site_agent.tasks.worker``), starting one when a run first arrives and closing it after the run's final step
or when it has been idle too long. The task process holds torch, the cell and the site's data
between rounds.

Starting a task process costs seconds (importing torch and its optimiser machinery). While the
site is *warm* (``warm_seconds`` after the agent starts or after its last step) it keeps one
spare task process ready, which has imported torch and nothing else: the next run adopts it,
and a new spare is started once that run has finished. A cold site (the warm period over, or
``warm_seconds`` 0) holds no spare and costs only the agent's own memory.

Each run gets a scratch folder of its own (``scratch/run-ID``), created empty when the run adopts
its task process, the one place it may write, and removed when the run ends at this site (kept when
the site admin asks, ``flip-site start --keep-scratch``). A task process's stdout and stderr come to
the agent through a pipe: the agent appends them to ``logs/task-processes.log`` until a run adopts
the process, then to ``logs/run-ID.log``; the task itself never sees the log folder.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import IO

from flip_core.codec import frame_header
from flip_core.errors import FlipError
from flip_core.protocol import StepResult, encode_result
from flip_core.status import Phase, StepStatus
from site_agent.sandbox import task_user
from site_agent.tasks.messages import ADOPT, ISOLATION_REFUSED, READY, STEP, receive_sized, send_sized

log = logging.getLogger(__name__)

IDLE_SECONDS = 600.0
RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what a run id must look like to name a folder here
REAP_SECONDS = 30.0


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


class TaskOutput:
    """Copies a task process's output (a pipe) to the site's log: the spares' log, then its run's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.touch()

    def switch(self, path: Path) -> None:
        with self._lock:
            self.path = path
            path.touch()

    def copy(self, stream: IO[bytes]) -> None:
        """Until the process closes its end (call in a thread of its own)."""
        with stream:
            for chunk in iter(lambda: stream.read1(1 << 16), b""):  # type: ignore[attr-defined]
                with self._lock, open(self.path, "ab") as sink:
                    sink.write(chunk)


class Worker:
    """One warm task process and the connection to it."""

    def __init__(self, site_root: Path) -> None:
        ours, theirs = socket.socketpair()
        for folder in ("logs", "scratch"):
            (site_root / folder).mkdir(parents=True, exist_ok=True)
        self.logs = site_root / "logs"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "site_agent.tasks.worker", str(site_root), "--fd", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            env=task_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=site_root / "scratch",  # also its sys.path[0]: nothing else of the agent's folder
        )  # no PDEATHSIG here: it fires when the spawning *thread* ends; the worker watches its parent
        theirs.close()
        self.output = TaskOutput(self.logs / "task-processes.log")
        assert self.process.stdout is not None
        threading.Thread(target=self.output.copy, args=(self.process.stdout,), name="task-output", daemon=True).start()
        self.conn = Connection(ours.detach())
        self.lock = threading.Lock()
        self.last_used = time.monotonic()
        self.ready = False

    def _await_ready(self) -> None:
        """The process says "ready" once torch is loaded (called with the lock held)."""
        if not self.ready:
            if self.conn.recv_bytes() != READY:
                raise OSError("the task process did not start properly")
            self.ready = True

    def wait_ready(self) -> None:
        with self.lock:
            self._await_ready()

    def adopt(self, run_id: str, scratch: Path, memory_mb: int | None, cohort: list[int] | None = None) -> None:
        """Make this the task process of ``run_id``: its log, its scratch folder, its memory limit, the rows of
        its cohort if it trains on one (before its first step)."""
        with self.lock:
            self._await_ready()
            self.output.switch(self.logs / f"run-{run_id}.log")
            settings = {"run_id": run_id, "scratch": str(scratch), "memory_mb": memory_mb, "cohort": cohort}
            self.conn.send_bytes(ADOPT + json.dumps(settings).encode())
            if self.conn.recv_bytes() != READY:
                raise OSError("the task process did not take its run")

    def call(self, blob: bytes | bytearray, seconds: float | None = None) -> bytes | bytearray:
        """Run one step; at ``seconds`` the task process is killed and :class:`TimeLimit` raised."""
        with self.lock:
            self._await_ready()
            self.last_used = time.monotonic()
            send_sized(self.conn, blob)
            if seconds is not None and not self.conn.poll(seconds):
                self.kill()
                raise TimeLimit(seconds)
            told = self.conn.recv_bytes()
            if not told.startswith(STEP):  # not the worker's framing (task code writing to the channel itself):
                return told  # handed on as the result, which the output guard refuses unless it is one
            return receive_sized(self.conn, told)

    def kill(self) -> None:
        """SIGKILL the task process and whatever it started (its own session; the sandboxed child dies with it)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def close(self) -> None:
        self.conn.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class TaskService:
    """Runs steps in warm per-run task processes."""

    def __init__(
        self,
        site_name: str,
        site_root: Path,
        warm_seconds: float = 0.0,
        on_change: Callable[[], None] = lambda: None,
        *,
        keep_scratch: bool = False,
    ) -> None:
        self.site_name = site_name
        self.site_root = site_root
        self.warm_seconds = warm_seconds
        self.on_change = on_change  # told when the site becomes warm or stops being warm
        self.keep_scratch = keep_scratch  # the site admin's choice, for debugging a task
        self.workers: dict[str, Worker] = {}
        self.spare: Worker | None = None
        self.last_step = time.monotonic()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if not keep_scratch:  # an earlier agent's runs: no task process of theirs outlives it
            for stale in (site_root / "scratch").glob("run-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def scratch(self, run_id: str) -> Path:
        return self.site_root / "scratch" / f"run-{run_id}"

    def warm_up(self) -> None:
        """Start a spare task process if the site is warm and has none (call off the reply path)."""
        with self._lock:
            if self._closed.is_set() or self.warm_seconds <= 0 or (self.spare and self.spare.process.poll() is None):
                return
            if time.monotonic() - self.last_step > self.warm_seconds:
                return
            spare = self.spare = Worker(self.site_root)
        try:
            spare.wait_ready()
        except (EOFError, OSError):
            log.warning("the spare task process did not start (see logs/task-processes.log)")
            return
        log.info("a spare task process is ready (pid %s)", spare.process.pid)
        self.on_change()

    @property
    def warm(self) -> bool:
        """A spare task process is loaded and waiting."""
        spare = self.spare
        return spare is not None and spare.ready and spare.process.poll() is None

    def _adopt(self) -> Worker:
        """The spare task process if one is alive, else a new one (called with the lock held)."""
        spare, self.spare = self.spare, None
        if spare is not None and spare.process.poll() is None:
            threading.Thread(target=self.on_change, daemon=True).start()
            return spare
        return Worker(self.site_root)

    def step(
        self,
        blob: bytes | bytearray,
        seconds: float | None = None,
        memory_mb: int | None = None,
        cohort: list[int] | None = None,
    ) -> bytes | bytearray:
        """Run one encoded step in its run's task process, within ``seconds`` (killed after) and
        ``memory_mb`` (set when the run adopts its process, with ``cohort``: the rows it trains on);
        the encoded result."""
        head = frame_header(blob)
        run_id, phase = str(head["run_id"]), str(head["phase"])
        if not RUN_ID.match(run_id):
            return self._failure("BadRequest", "the site agent (the run id is not one)")
        with self._lock:
            self.last_step = time.monotonic()
            worker = self.workers.get(run_id)
            adopted = worker is None or worker.process.poll() is not None
            if adopted:
                worker = self.workers[run_id] = self._adopt()
                log.info("run %s: task process %s", run_id, worker.process.pid)
        assert worker is not None
        try:
            if adopted:
                self._make_scratch(run_id)
                worker.adopt(run_id, self.scratch(run_id), memory_mb, cohort)
            reply = worker.call(blob, seconds)
        except TimeLimit as stopped:
            self._drop(run_id)
            log.warning("run %s: the task process was %s", run_id, stopped)
            return self._failure("TimeLimit", f"the task process ({stopped})")
        except (EOFError, OSError):
            code = worker.process.wait()
            self._drop(run_id)
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            log.warning("the task process of run %s died (%s)", run_id, why)
            if code == ISOLATION_REFUSED:
                where = "the task process (it could not be isolated: see the site's logs/task-processes.log)"
                return self._failure("TaskIsolation", where)
            return self._failure("TaskProcessDied", f"the task process ({why})")
        if phase == Phase.EVALUATE or frame_header(reply)["status"] != StepStatus.OK:
            # the run's final step here (its last round, or this site is out of the run after an error):
            # close its process and make a spare ready, off the reply path
            threading.Thread(target=self._retire, args=(run_id,), daemon=True).start()
        return reply

    def _make_scratch(self, run_id: str) -> None:
        """The run's scratch folder, empty, the task's own (the task user's, where the agent is root)."""
        folder = self.scratch(run_id)
        folder.mkdir(mode=0o700, exist_ok=True)
        if (user := task_user()) is not None:
            os.chown(folder, *user)

    def _failure(self, error_type: str, where: str) -> bytes:
        return encode_result(
            StepResult(site=self.site_name, status=StepStatus.ERROR, error_type=error_type, error_where=where)
        )

    def _drop(self, run_id: str) -> None:
        """The run's task process is gone: forget it, clear its scratch, have a spare ready (off this path)."""
        with self._lock:
            self.workers.pop(run_id, None)
        self._clear_scratch(run_id)
        threading.Thread(target=self.warm_up, daemon=True).start()

    def _clear_scratch(self, run_id: str) -> None:
        if not self.keep_scratch:
            shutil.rmtree(self.scratch(run_id), ignore_errors=True)

    def _retire(self, run_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(run_id, None)
        if worker is not None:
            worker.close()
        self._clear_scratch(run_id)
        self.warm_up()  # the next run finds a spare ready

    def reap_forever(self) -> None:
        """Close task processes idle for ``IDLE_SECONDS`` (a run whose hub went away)."""
        while not self._closed.wait(REAP_SECONDS):
            idle = [r for r, w in list(self.workers.items()) if time.monotonic() - w.last_used > IDLE_SECONDS]
            for run_id in idle:
                log.info("closing the idle task process of run %s", run_id)
                self._retire(run_id)
            with self._lock:
                cooled = self.spare if time.monotonic() - self.last_step > self.warm_seconds else None
                if cooled is not None:
                    self.spare = None
            if cooled is not None:
                log.info("the site has been idle for %.0f s: closing its spare task process", self.warm_seconds)
                cooled.close()
                self.on_change()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()
        for run_id in list(self.workers):
            self._retire(run_id)
