"""The site agent's task service: warm task processes, reached by the per-message ClientApp.

Flower's SuperNode starts a short-lived ClientApp process for each message. That process
(``flower_client``) forwards the step to the agent over a local socket (``run/agent.sock``,
authenticated with a key only the site's user can read); the agent hands it to the run's
warm task process (``worker``), starting one when a run first arrives and closing it after
the run's final step or when it has been idle too long.
"""

from __future__ import annotations

import ctypes
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from site_agent.protocol import PHASE_EVALUATE, StepResult, decode_request, encode_result

log = logging.getLogger(__name__)

SOCKET_NAME = "agent.sock"
KEY_NAME = "agent.key"
IDLE_SECONDS = 600.0


def die_with_parent() -> None:
    """In a child before exec: receive SIGKILL when the agent dies, however it dies."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def run_dir(site_root: Path) -> Path:
    return site_root / "run"


def connect(site_root: Path) -> Connection:
    """The ClientApp's side: a connection to this site's agent."""
    folder = run_dir(site_root)
    key = (folder / KEY_NAME).read_bytes()
    return Client(str(folder / SOCKET_NAME), family="AF_UNIX", authkey=key)


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
    """Accepts steps from ClientApp processes and runs them in warm per-run workers."""

    def __init__(self, site_name: str, site_root: Path) -> None:
        self.site_name = site_name
        self.site_root = site_root
        self.workers: dict[str, Worker] = {}
        self._lock = threading.Lock()
        folder = run_dir(site_root)
        folder.mkdir(mode=0o700, exist_ok=True)
        key_path = folder / KEY_NAME
        key_path.write_bytes(secrets.token_bytes(32))
        key_path.chmod(0o600)
        sock_path = folder / SOCKET_NAME
        sock_path.unlink(missing_ok=True)
        self.listener = Listener(str(sock_path), family="AF_UNIX", authkey=key_path.read_bytes())
        os.chmod(sock_path, 0o600)

    def serve_forever(self) -> None:
        threading.Thread(target=self._reap, name="reaper", daemon=True).start()
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # closed
            except Exception as exc:  # noqa: BLE001 - a bad handshake must not stop the service
                log.warning("refused a local connection: %s", exc)
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: Connection) -> None:
        with conn:
            try:
                blob = conn.recv_bytes()
            except EOFError:
                return
            conn.send_bytes(self.step(blob))

    def step(self, blob: bytes) -> bytes:
        request = decode_request(blob)
        with self._lock:
            worker = self.workers.get(request.run_id)
            if worker is None or worker.process.poll() is not None:
                worker = self.workers[request.run_id] = Worker(self.site_root, request.run_id)
        try:
            reply = worker.call(blob)
        except (EOFError, OSError):
            code = worker.process.wait()
            with self._lock:
                self.workers.pop(request.run_id, None)
            why = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            log.warning("the task process of run %s died (%s)", request.run_id, why)
            return encode_result(StepResult(site=self.site_name, status="error", error_type="TaskProcessDied",
                                            error_where=f"the task process ({why})"))
        if request.phase == PHASE_EVALUATE:  # the run's final step: close its process, off the reply path
            threading.Thread(target=self._retire, args=(request.run_id,), daemon=True).start()
        return reply

    def _retire(self, run_id: str) -> None:
        with self._lock:
            worker = self.workers.pop(run_id, None)
        if worker is not None:
            worker.close()

    def _reap(self) -> None:
        while True:
            time.sleep(30)
            idle = [r for r, w in list(self.workers.items()) if time.monotonic() - w.last_used > IDLE_SECONDS]
            for run_id in idle:
                log.info("closing the idle task process of run %s", run_id)
                self._retire(run_id)

    def close(self) -> None:
        self.listener.close()
        for run_id in list(self.workers):
            self._retire(run_id)
