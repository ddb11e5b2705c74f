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

Every run is held to the site's limits (``[policy]``, ``site_agent.governance.policy.TaskLimits``): its result is
read under a cap, in bounded chunks, by the step's deadline (``site_agent.tasks.messages``); a step's output kept in
the log is capped (``site_agent.tasks.output``); its scratch is a tmpfs of a fixed size, any file it writes is capped,
and its processes and threads are counted apart from every other run's (``site_agent.sandbox``). A limit reached is
one fixed sentence for the researcher, naming the site and the limit (:meth:`TaskService.failures`), and a record in
the site's audit log; the site serves the next run. A step runs up to its time limit (the project's); a task process
is closed for idleness only when no step is running in it (:func:`idle_too_long`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flip_core.codec import frame_header
from flip_core.protocol import StepResult, encode_result
from flip_core.status import Phase, StepStatus
from site_agent.data.catalog import CatalogError, Handed
from site_agent.governance.policy import TaskLimits
from site_agent.sandbox import process_limit, task_user
from site_agent.sandbox.cgroups import TaskGroups
from site_agent.tasks.adoption import Adoption
from site_agent.tasks.limits import LIMITS, SiteLimits, idle_too_long
from site_agent.tasks.messages import (
    ISOLATION_REFUSED,
    Oversized,
)
from site_agent.tasks.process import DEFAULT_LIMITS, TimeLimit, Worker, task_environment
from site_agent.tasks.zygote import Zygote

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # what a run id must look like to name a folder here
REAP_SECONDS = 30.0


def _said(reply: bytes | bytearray) -> tuple[str, str]:
    """A reply's status and error type as its header claims them (("", "") when it has none)."""
    try:
        head = frame_header(reply)
    except Exception:  # noqa: BLE001 - the task process's bytes: how they fail to parse is its choice
        return "", ""
    return str(head.get("status", "")), str(head.get("error_type", ""))


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
        limits: TaskLimits = DEFAULT_LIMITS,
        groups: TaskGroups | None = None,
    ) -> None:
        """``limits``: the site's on every run (``[policy]``); ``groups``: the agent's cgroups, where the host gives
        them (``site_agent.sandbox.cgroups.TaskGroups.open``): a run's memory and processes counted all together."""
        self.site_name = site_name
        self.site_root = site_root
        self.warm_seconds = warm_seconds
        self.on_change = on_change  # told when the site becomes warm or stops being warm
        self.keep_scratch = keep_scratch  # the site admin's choice, for debugging a task
        self.limits = limits
        self.site_limits = SiteLimits(site_name, site_root, limits)  # what is said and audited of each
        self.groups = groups
        self._stopped: dict[str, bytes] = {}  # per run: the failure of a step whose task process had to go
        self.workers: dict[str, Worker] = {}
        self._adopting: set[str] = set()  # runs being handed their task process now (counted as holding one)
        self.spare: Worker | None = None
        self.zygote: Zygote | None = None  # while the site is warm: its task processes are forked from it
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
        self._start_zygote()
        with self._lock:
            if self._closed.is_set() or self.warm_seconds <= 0 or (self.spare and self.spare.process.poll() is None):
                return
            if time.monotonic() - self.last_step > self.warm_seconds:
                return
            spare = self.spare = self._worker()
        try:
            spare.wait_ready()
        except (EOFError, OSError):
            log.warning("the spare task process did not start (see logs/task-processes.log)")
            return
        log.info("a spare task process is ready (pid %s)", spare.process.pid)
        self.on_change()

    def _start_zygote(self) -> None:
        """The site's zygote (``site_agent.tasks.zygote``), started if the site is warm and has none, or lost the one
        it had; not again where one could not load (task processes then start anew: the log says why)."""
        with self._lock:
            if self._closed.is_set() or self.warm_seconds <= 0 or time.monotonic() - self.last_step > self.warm_seconds:
                return
            zygote = self.zygote
            started = zygote is None or (zygote.gone.is_set() and zygote.ready.is_set())
            if zygote is None or started:  # none yet, or the one it had ended after loading (not one that never could)
                zygote = self.zygote = Zygote(self.site_root, task_environment())
        if not zygote.wait_ready() and started:  # said once, by the call that started it
            log.warning("task processes start anew: their zygote could not load (see logs/task-processes.log)")

    @property
    def warm(self) -> bool:
        """A spare task process is loaded and waiting."""
        spare = self.spare
        return spare is not None and spare.ready and spare.process.poll() is None

    def _adopt(self, files: tuple[Path, ...] = ()) -> Worker:
        """The run's task process (called with the lock held): the spare if one is alive, else a new one; a new one
        too, with ``files`` bound, where the run's cell reads files by path (``site_agent.tasks.adoption``)."""
        if files:
            return self._worker(files)
        spare, self.spare = self.spare, None
        if spare is not None and spare.process.poll() is None:
            threading.Thread(target=self.on_change, daemon=True).start()
            return spare
        return self._worker()

    def _worker(self, bind: tuple[Path, ...] = ()) -> Worker:
        group = None
        if self.groups is not None:
            try:
                group = self.groups.new(process_limit())
            except OSError as exc:
                log.warning("no cgroup for a task process (%s): its limits are the fallback's", exc)
        return Worker(
            self.site_root,
            self.limits,
            self.site_limits.log_cut,
            keep_scratch=self.keep_scratch,
            bind=bind,
            group=group,
            zygote=self.zygote,
        )

    @property
    def failures(self) -> dict[str, tuple[str, ...]]:
        """The sentence the researcher gets for each of this site's limits that stops a step (fixed text)."""
        return self.site_limits.failures

    def notes(self, run_id: str) -> tuple[str, ...]:
        """What the researcher is told of a limit ``run_id``'s last step reached here without failing, once."""
        return self.site_limits.notes(run_id)

    def step(
        self,
        blob: bytes | bytearray,
        seconds: float | None = None,
        memory_mb: int | None = None,
        adoption: Callable[[], Adoption] | None = None,
    ) -> bytes | bytearray:
        """Run one encoded step in its run's task process, within ``seconds`` (killed after) and ``memory_mb`` (set
        when the run adopts its process, with what ``adoption`` makes then: the run's own rows); the encoded result."""
        head = frame_header(blob)
        run_id, phase = str(head["run_id"]), str(head["phase"])
        if not RUN_ID.match(run_id):
            return self._failure("BadRequest", "the site agent (the run id is not one)")
        worker, run = self.workers.get(run_id), None
        if worker is None or worker.process.poll() is not None:  # adopted now: what the run was approved for, first
            if not self._take_slot(run_id):
                self.site_limits.reached(run_id, "runs", self.limits.runs_limit, phase, head.get("round"))
                return self._failure("RunLimit", self.failures["RunLimit"][0])
            try:
                run = adoption() if adoption is not None else Adoption(self.site_name, None, "", Handed(b""))
            except CatalogError as exc:
                self._adopting.discard(run_id)
                log.warning("run %s: its data cannot be handed to a task process: %s", run_id, exc)
                return self._failure("DatasetUnavailable", exc.public)
        with self._lock:
            self.last_step = time.monotonic()
            if run is not None:
                try:
                    worker = self.workers[run_id] = self._adopt(run.handed.files)
                finally:
                    self._adopting.discard(run_id)
                log.info("run %s: task process %s", run_id, worker.process.pid)
            assert worker is not None
            worker.steps_running += 1  # the reaper leaves it alone until the step is over
            worker.last_used = time.monotonic()
        try:
            reply = self._call(worker, run_id, run, blob, seconds, memory_mb)
        finally:
            with self._lock:
                worker.steps_running -= 1
                worker.last_used = time.monotonic()
        if reply is None:  # the process is gone, and the failure said why
            return self._stopped.pop(run_id)
        status, error_type = _said(reply)
        if error_type in LIMITS:  # the task process met a limit (its own sentence: LIMITS's, in the guard)
            self.site_limits.reached(run_id, LIMITS[error_type], None, phase, head.get("round"))
        if phase == Phase.EVALUATE or status != StepStatus.OK:
            # the run's final step here (its last round, or this site is out of the run after an error):
            # close its process and make a spare ready, off the reply path
            threading.Thread(target=self._retire, args=(run_id,), daemon=True).start()
        return reply

    def _take_slot(self, run_id: str) -> bool:
        """Count ``run_id`` among the runs holding a task process here, unless as many as the site's ``runs_limit``
        already do (each may use its project's memory: a researcher's many runs at once must not stop the site)."""
        with self._lock:
            holding = (set(self.workers) | self._adopting) - {run_id}
            if len(holding) >= self.limits.runs_limit:
                log.warning("run %s refused: %d runs hold a task process here already", run_id, len(holding))
                return False
            self._adopting.add(run_id)
            return True

    def _call(
        self,
        worker: Worker,
        run_id: str,
        run: Adoption | None,
        blob: bytes | bytearray,
        seconds: float | None,
        memory_mb: int | None,
    ) -> bytes | bytearray | None:
        """The step's reply from its task process; None when the process had to go (the failure is in
        ``_stopped``): its time limit, its result's cap, or it died."""
        head = frame_header(blob)
        phase, round_ = str(head["phase"]), head.get("round")
        try:
            if run is not None:  # adopted by this run now: handed what it was approved for
                self._limit_memory(worker, memory_mb)
                self._make_scratch(run_id)
                worker.adopt(run_id, self.scratch(run_id), memory_mb, run)
            return worker.call(blob, seconds, self.site_limits.cap(blob))
        except TimeLimit as stopped:
            self._drop(run_id)
            log.warning("run %s: the task process was %s", run_id, stopped)
            self.site_limits.reached(run_id, "time", stopped.seconds, phase, round_)
            failure = self._failure("TimeLimit", f"the task process ({stopped})")
        except Oversized as refused:
            self._drop(run_id)
            log.warning("run %s: the task process's result passed the site's cap (%s): stopped", run_id, refused)
            self.site_limits.reached(run_id, "result", refused.cap, phase, round_)
            failure = self._failure("ResultLimit", self.failures["ResultLimit"][0])
        except (EOFError, OSError):
            failure = self._died(worker, run_id, phase, round_)
        self._stopped[run_id] = failure
        return None

    @staticmethod
    def _limit_memory(worker: Worker, memory_mb: int | None) -> None:
        """The run's memory on its task process's cgroup, where it has one (else RLIMIT_DATA alone holds it)."""
        if worker.group is not None and memory_mb is not None:
            try:
                worker.group.limit_memory(memory_mb)
            except OSError as exc:
                log.warning("cannot set the memory of a task process's cgroup (%s): RLIMIT_DATA holds", exc)

    def _died(self, worker: Worker, run_id: str, phase: str, round_: Any) -> bytes:
        """The failure of a step whose task process ended during it (killed for a file too large, say)."""
        code = worker.process.wait()
        out_of_memory = worker.group is not None and worker.group.out_of_memory()
        worker.close()  # its connection and cgroup
        self._drop(run_id)
        why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        log.warning("the task process of run %s died (%s)", run_id, why)
        if code == ISOLATION_REFUSED:
            where = "the task process (it could not be isolated: see the site's logs/task-processes.log)"
            return self._failure("TaskIsolation", where)
        if code in (-signal.SIGXFSZ, 128 + signal.SIGXFSZ):  # a file past RLIMIT_FSIZE, the task let the signal kill it
            self.site_limits.reached(run_id, "file_size", self.limits.file_limit_mb, phase, round_)
            return self._failure("FileSizeLimit", self.failures["FileSizeLimit"][0])
        if out_of_memory:  # the cgroup's memory.max (the sandbox's waiting process ends with 128 + SIGKILL)
            self.site_limits.reached(run_id, "memory", None, phase, round_)
            return self._failure("MemoryLimit", self.failures["MemoryLimit"][0])
        return self._failure("TaskProcessDied", f"the task process ({why})")

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

    def settle(self, run_id: str, released: bytes | bytearray) -> None:
        """The site's verdict on a step (what the output guard released, not what its task process claimed): a step
        that did not succeed ends the run here, so its process is closed and a spare made ready, off the reply path."""
        if _said(released)[0] != StepStatus.OK and run_id in self.workers:
            threading.Thread(target=self._retire, args=(run_id,), daemon=True).start()

    def _retire(self, run_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(run_id, None)
        if worker is not None:
            worker.close()
        self._clear_scratch(run_id)
        self.warm_up()  # the next run finds a spare ready

    def reap_forever(self) -> None:
        """Close task processes idle for ``IDLE_SECONDS`` (a run whose hub went away; never one in a step)."""
        while not self._closed.wait(REAP_SECONDS):
            self.reap(time.monotonic())

    def reap(self, now: float) -> None:
        """Close what is idle at ``now``: task processes no step is running in (:func:`idle_too_long`), the spare
        of a site that has cooled."""
        with self._lock:
            idle = {r: w for r, w in self.workers.items() if idle_too_long(now, w.last_used, w.steps_running)}
            for run_id in idle:
                del self.workers[run_id]
            cooled = self.spare if now - self.last_step > self.warm_seconds else None
            if cooled is not None:
                self.spare = None
            # its zygote too, once no task process forked from it is left (they end with it)
            zygote = self.zygote if now - self.last_step > self.warm_seconds and not self.workers else None
            if zygote is not None:
                self.zygote = None
        for run_id, worker in idle.items():
            log.info("closing the idle task process of run %s", run_id)
            worker.close()
            self._clear_scratch(run_id)
        if idle:
            self.warm_up()  # the next run finds a spare ready, if the site is still warm
        if cooled is not None:
            log.info("the site has been idle for %.0f s: closing its spare task process", self.warm_seconds)
            cooled.close()
            self.on_change()
        if zygote is not None:
            zygote.close()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()
        for run_id in list(self.workers):
            self._retire(run_id)
        with self._lock:
            zygote, self.zygote = self.zygote, None
        if zygote is not None:
            zygote.close()
