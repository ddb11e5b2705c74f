"""The site agent's task service: one warm task process per run.

The agent hands each step (the bytes of ``site_agent.protocol``) to the run's task process
(``worker``), starting one when a run first arrives and closing it after the run's final step
or when it has been idle too long. The task process holds torch, the cell and the site's data
between rounds.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from site_agent.protocol import PHASE_EVALUATE, StepResult, encode_result, header

log = logging.getLogger(__name__)

IDLE_SECONDS = 600.0
REAP_SECONDS = 30.0


class Worker:
    """One warm task process and the connection to it."""

    def __init__(self, site_root: Path, run_id: str) -> None:
        ours, theirs = socket.socketpair()
        with open(site_root / "logs" / f"run-{run_id}.worker.log", "ab") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "site_agent.worker", str(site_root), "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
            )  # no PDEATHSIG here: it fires when the spawning *thread* ends; the worker watches its parent
        theirs.close()
        self.conn = Connection(ours.detach())
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    def call(self, blob: bytes) -> bytes:
        with self.lock:
            self.last_used = time.monotonic()
            self.conn.send_bytes(blob)
            return self.conn.recv_bytes()

    def close(self) -> None:
        self.conn.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class TaskService:
    """Runs steps in warm per-run task processes."""

    def __init__(self, site_name: str, site_root: Path) -> None:
        self.site_name = site_name
        self.site_root = site_root
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def step(self, blob: bytes) -> bytes:
        """Run one encoded step in its run's task process; the encoded result."""
        head = header(blob)
        run_id, phase = str(head["run_id"]), str(head["phase"])
        with self._lock:
            worker = self.workers.get(run_id)
            if worker is None or worker.process.poll() is not None:
                worker = self.workers[run_id] = Worker(self.site_root, run_id)
        try:
            reply = worker.call(blob)
        except (EOFError, OSError):
            code = worker.process.wait()
            with self._lock:
                self.workers.pop(run_id, None)
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            log.warning("the task process of run %s died (%s)", run_id, why)
            return encode_result(StepResult(site=self.site_name, status="error", error_type="TaskProcessDied",
                                            error_where=f"the task process ({why})"))
        if phase == PHASE_EVALUATE:  # the run's final step: close its process, off the reply path
            threading.Thread(target=self._retire, args=(run_id,), daemon=True).start()
        return reply

    def _retire(self, run_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(run_id, None)
        if worker is not None:
            worker.close()

    def reap_forever(self) -> None:
        """Close task processes idle for ``IDLE_SECONDS`` (a run whose hub went away)."""
        while not self._closed.wait(REAP_SECONDS):
            idle = [r for r, w in list(self.workers.items()) if time.monotonic() - w.last_used > IDLE_SECONDS]
            for run_id in idle:
                log.info("closing the idle task process of run %s", run_id)
                self._retire(run_id)

    def close(self) -> None:
        self._closed.set()
        for run_id in list(self.workers):
            self._retire(run_id)
