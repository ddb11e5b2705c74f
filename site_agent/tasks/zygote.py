"""Task processes forked from one loaded process per site (a "zygote", as Android starts its apps): torch is
imported once per site agent, not once per run.

Each run has a task process of its own, started fresh (``site_agent.tasks.process``). Started as a new Python, a
task process spends two to five seconds of CPU importing torch before it is ready, at every site, for every run.
The zygote is a process the site agent starts once, in the same environment as a task process (the agent's
tokens and paths stay with the agent), that imports what every task process imports (torch, numpy, pandas, FLIP's
task code) and then only waits. For each task process the agent asks it, over their connection, to fork: the
child is then exactly what ``python -m site_agent.tasks.worker`` would have been after its imports (one thread,
nothing of the site's, no task code yet) and goes on as the worker does: its cgroup, its sandbox, its channel.

What the zygote holds, every task process inherits: so it holds nothing of the site. It is handed no data, no
key, no dataset path; what it is sent is a task process's command line (the site's folder, the sizes of its
limits, its cgroup's path) and the descriptors of its channel and output. The child closes every descriptor but
its own before anything else runs, re-seeds the random generators a new process would seed (Python's ``random``
re-seeds itself at a fork), and dies with the zygote (``PR_SET_PDEATHSIG``), which ends when the agent closes the
connection or goes away. A site's task processes share the zygote's address layout (as Android's apps share
theirs); a task runs native code of its choosing in its sandbox anyway, and the process that parses what it sends,
the agent, is not one of them.

The agent sees a forked task process as it sees a started one (:class:`Forked` has what the worker uses of
``subprocess.Popen``): the zygote reaps each child and reports its exit code, and stops one (its process group)
when asked, so that a pid is only ever signalled while it is still the zygote's child.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("flip.site.zygote")

MESSAGE_BYTES = 1 << 16  # the longest request or report (a command line, an exit code)
MAX_FDS = 8  # descriptors one request passes at most (channel, files' list, output)
PARENT_CHECK_SECONDS = 1.0  # how often the zygote looks for its agent, besides seeing the connection close
READY_SECONDS = 120.0  # how long the agent waits for a new zygote to load torch, at most
PR_SET_PDEATHSIG, PR_SET_NAME = 1, 15  # a name is what ps and top show (a forked one has the zygote's command line)
FD_OPTIONS = ("--fd", "--bind-fd")  # the worker's options that name a passed descriptor


# ------------------------------------------------------------------------------------------------ in the zygote


def _preload() -> None:
    """What every task process imports, once here."""
    import numpy  # noqa: F401
    import pandas  # noqa: F401
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    from site_agent.sandbox.isolation import libc
    from site_agent.tasks import runner, worker  # noqa: F401

    libc().prctl(PR_SET_NAME, b"flip-zygote", 0, 0, 0)  # found (ldconfig) once


def _send(control: socket.socket, message: dict[str, Any]) -> None:
    control.send(json.dumps(message).encode())


def serve(control: socket.socket) -> int:
    """The zygote's loop: fork a task process when asked, report each child's end, stop one when asked; end when
    the agent closes the connection or is gone."""
    agent = os.getppid()
    _preload()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # only to wake the loop: the loop reaps
    children: set[int] = set()
    _send(control, {"ready": os.getpid()})
    while os.getppid() == agent:
        readable = select.select([control.fileno(), wake_r], [], [], PARENT_CHECK_SECONDS)[0]
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 512)
        _reap(control, children)
        if control.fileno() not in readable:
            continue
        message, fds, _, _ = socket.recv_fds(control, MESSAGE_BYTES, MAX_FDS)
        if not message:  # the agent closed the connection: its task processes die with this one
            break
        request = json.loads(message)
        if "spawn" in request:
            pid = os.fork()
            if pid == 0:
                _become(request["spawn"], fds)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            _send(control, {"pid": pid})
        elif "kill" in request and request["kill"] in children:  # never a pid this process has reaped
            _kill(int(request["kill"]), bool(request.get("group")))
    for pid in children:
        _kill(pid, True)
    return 0


def _reap(control: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        children.discard(pid)
        _send(control, {"exit": pid, "code": os.waitstatus_to_exitcode(status)})


def _kill(pid: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            try:
                os.killpg(pid, signal.SIGKILL)  # its own process group (made in the sandbox), and what it started
                return
            except ProcessLookupError:  # not yet a group's leader
                pass
        os.kill(pid, signal.SIGKILL)


def _become(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked child: become the task process ``request`` describes; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        from site_agent.sandbox.isolation import libc

        zygote = os.getppid()
        libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc().prctl(PR_SET_NAME, b"flip-task", 0, 0, 0)
        if os.getppid() != zygote:
            os._exit(1)
        *passed, output = fds
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        keep = {0, 1, 2, *passed}
        for entry in os.listdir("/proc/self/fd"):  # nothing of the zygote's stays open (its connection above all)
            if int(entry) not in keep:
                with contextlib.suppress(OSError):
                    os.close(int(entry))
        numbers = dict(zip(request["fds"], passed, strict=True))
        given: list[str] = request["argv"]
        argv = [str(numbers[int(a)]) if b in FD_OPTIONS else a for b, a in zip(["", *given[:-1]], given, strict=True)]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = argv
        _reseed()
        from site_agent.tasks import worker

        code = worker.main(argv[3:])  # after "python -m site_agent.tasks.worker"
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def _reseed() -> None:
    """Fresh seeds where a new process would have had them (a run with a seed sets its own)."""
    import numpy
    import torch

    numpy.random.seed()
    torch.seed()


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[1] != "--fd":
        print("usage: python -m site_agent.tasks.zygote --fd N", file=sys.stderr)
        return 2
    return serve(socket.socket(fileno=int(sys.argv[2])))


# ------------------------------------------------------------------------------------------------ in the agent


class Forked:
    """A task process the zygote forked, as the site agent's worker uses a ``subprocess.Popen``."""

    def __init__(self, zygote: Zygote, pid: int, stdout: IO[bytes]) -> None:
        self.zygote = zygote
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None
        self._ended = threading.Event()

    def _end(self, code: int) -> None:
        self.returncode = code
        self._ended.set()

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended.wait(timeout):
            raise subprocess.TimeoutExpired(f"task process {self.pid}", timeout or 0.0)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        """SIGKILL it (its sandboxed child dies with it)."""
        if self.returncode is None:
            self.zygote.kill(self.pid, group=False)

    def kill_group(self) -> None:
        """SIGKILL its process group: it and whatever it started."""
        if self.returncode is None:
            self.zygote.kill(self.pid, group=True)


class Zygote:
    """The agent's end: starts the zygote (:func:`serve`) and asks it for task processes (:meth:`spawn`)."""

    def __init__(self, site_root: Path, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        (site_root / "logs").mkdir(parents=True, exist_ok=True)
        (site_root / "scratch").mkdir(parents=True, exist_ok=True)
        with open(site_root / "logs" / "task-processes.log", "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "site_agent.tasks.zygote", "--fd", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=site_root / "scratch",  # as a task process's (its sys.path[0], which its children keep)
            )
        theirs.close()
        self.env = env
        self.control = ours
        self.ready = threading.Event()
        self.gone = threading.Event()
        self._settled = threading.Event()  # ready, or gone before it was
        self._closing = False
        self._lock = threading.Lock()  # one request at a time: its answer comes back in order
        self._pids: list[int] = []
        self._answered = threading.Condition()
        self._forked: dict[int, Forked] = {}
        self._ended: dict[int, int] = {}  # exits reported before the fork's answer was read
        threading.Thread(target=self._listen, name="zygote", daemon=True).start()

    def alive(self) -> bool:
        return self.ready.is_set() and not self.gone.is_set()

    def wait_ready(self, timeout: float = READY_SECONDS) -> bool:
        """Whether it has loaded and waits to fork (False: it ended first, or not within ``timeout``)."""
        self._settled.wait(timeout)
        return self.alive()

    def _listen(self) -> None:
        try:
            while message := self.control.recv(MESSAGE_BYTES):
                report = json.loads(message)
                if "ready" in report:
                    self.ready.set()
                    self._settled.set()
                elif "pid" in report:
                    with self._answered:
                        self._pids.append(int(report["pid"]))
                        self._answered.notify_all()
                elif "exit" in report:
                    pid, code = int(report["exit"]), int(report["code"])
                    with self._answered:
                        forked = self._forked.pop(pid, None)
                        if forked is None:
                            self._ended[pid] = code
                    if forked is not None:
                        forked._end(code)
        except OSError:
            pass
        finally:
            self.gone.set()
            self._settled.set()
            with self._answered:
                self._answered.notify_all()
                orphans, self._forked = list(self._forked.values()), {}
            for forked in orphans:  # killed with the zygote (PR_SET_PDEATHSIG)
                forked._end(-signal.SIGKILL)
            if self.ready.is_set() and not self._closing:
                log.warning("the zygote of this site's task processes ended (exit code %s)", self.process.poll())

    def spawn(self, argv: list[str], fds: list[int], cwd: Path) -> Forked:
        """A task process forked with the command line ``argv`` (``python -m site_agent.tasks.worker ...``), the
        descriptors ``fds`` (named in ``argv`` by these numbers), in ``cwd``, its stdout and stderr one pipe (its
        ``stdout``); OSError if the zygote is not there to fork it."""
        if not self.alive():
            raise OSError("the zygote is not running")
        request = {"spawn": {"argv": argv, "fds": fds, "env": self.env, "cwd": str(cwd)}}
        reading, writing = os.pipe2(os.O_CLOEXEC)
        stdout = open(reading, "rb")  # noqa: SIM115 - the worker's output copier reads it to its end
        try:
            with self._lock:
                socket.send_fds(self.control, [json.dumps(request).encode()], [*fds, writing])
                os.close(writing)
                writing = -1
                with self._answered:
                    if not self._answered.wait_for(lambda: self._pids or self.gone.is_set(), READY_SECONDS):
                        raise OSError("the zygote did not answer")
                    if not self._pids:
                        raise OSError("the zygote ended")
                    pid = self._pids.pop(0)
                    forked = Forked(self, pid, stdout)
                    if pid in self._ended:
                        forked._end(self._ended.pop(pid))
                    else:
                        self._forked[pid] = forked
        except BaseException:
            stdout.close()
            if writing >= 0:
                os.close(writing)
            raise
        return forked

    def kill(self, pid: int, group: bool) -> None:
        with contextlib.suppress(OSError):
            self.control.send(json.dumps({"kill": pid, "group": group}).encode())

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self.control.shutdown(socket.SHUT_RDWR)
        self.control.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


if __name__ == "__main__":
    sys.exit(main())
