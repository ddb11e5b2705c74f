"""The warm task process: one per run at a site, started by the site agent.

It leaves the host's network first (``site_agent.sandbox``), confines its files, loads torch, and holds nothing
of the site until a run adopts it (``site_agent.tasks.adoption``): then it is handed the run's own rows, sealed in
memory, takes the run's memory limit and its own scratch folder, loads the cell and its split once, and serves the
run's steps, one at a time, over the connection the agent handed it (file descriptor ``--fd``). A process started
for one run whose cell reads files by path (an imaging run) binds those files, and only those, into its sandbox
(``--bind-fd``, their list). Its stdout and stderr are a pipe to the agent, which writes them to the site's log; the
task sees neither the log folder nor the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.catalog import SiteConfig
from site_agent.sandbox import Sandbox, SandboxError, enter, install_seccomp, task_user
from site_agent.sandbox.cgroups import join
from site_agent.sandbox.handed import receive
from site_agent.sandbox.isolation import (
    ENV_ALLOW_FILES,
    ENV_ALLOW_SANDBOX,
    SYSTEM_READ,
    IsolationError,
    confine_files,
    drop_network,
    files_allowed,
    limit_memory,
    python_paths,
    sandbox_allowed,
    site_paths,
)
from site_agent.tasks.adoption import bound_files, run_site
from site_agent.tasks.devices import DeviceError, check_with_torch, device_nodes, task_device
from site_agent.tasks.messages import ADOPT, ISOLATION_REFUSED, READY, RESULT_RESERVE, STEP, receive_sized, send_sized

if TYPE_CHECKING:
    from site_agent.tasks.runner import TaskSession

ONE_RUN = 4  # its exit code when asked to take a second run, or to step before any run adopted it
ENV_THREADS = "FLIP_TASK_THREADS"
PARENT_CHECK_SECONDS = 0.5
# Task code yields the CPU to the site's control plane (its agent, and on a one-machine federation the
# SuperLink and the server loop): a starved control plane misses Flower's heartbeats and loses the run.
TASK_NICE = 19


def _watch_parent(parent: int) -> None:
    """Without a sandbox: exit at once when the site agent is gone, even in the middle of a step. (In the
    sandbox the process that waits for this one watches the agent, and this one dies with it.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(1)


def _yield_cpu() -> None:
    """Run below the site's control plane, also where the kernel schedules sessions as groups.

    With autogroup scheduling (``/proc/sys/kernel/sched_autogroup_enabled``, on by default in
    most distributions) a nice value only weighs within its session: 48 sites' task processes
    each in its site's session would get 48 equal shares against the SuperLink's one. So the
    task process takes a session of its own and lowers that session's weight too.
    """
    try:
        os.setsid()
    except PermissionError:  # already a session's leader (the sandbox made one)
        pass
    os.nice(TASK_NICE)
    try:
        Path("/proc/self/autogroup").write_text(str(TASK_NICE))
    except OSError:  # no autogroup scheduling in this kernel, or not ours to set: the nice value alone does it
        pass


def _isolate(step: Callable[[], None], allowed: bool, setting: str, loses: str) -> bool | None:
    """Take one isolation step: True when it held, False when it failed and the site's admin allows going
    without (with a warning), None when it failed and the task process must not start."""
    try:
        step()
    except (IsolationError, SandboxError) as exc:
        if not allowed:
            print(
                f"refusing to start: {exc} (a site that cannot do this can start its agent with {setting}=allow)",
                file=sys.stderr,
                flush=True,
            )
            return None
        print(f"WARNING: task code {loses}: {exc}", file=sys.stderr, flush=True)
        return False
    return True


def _sandbox(site: SiteConfig, images: list[Path], sizes: argparse.Namespace) -> Sandbox:
    """The task's view: the system files, the installation and the registered image files read-only, the site's
    scratch folder writable (a tmpfs of the site's scratch size, unless the admin keeps runs' folders), the site's GPU
    if it chose one; any file it writes at most the site's file size."""
    return Sandbox(
        read=tuple(map(Path, SYSTEM_READ)) + tuple(python_paths()) + tuple(images),
        write=(site.root / "scratch",),
        user=task_user(),
        devices=device_nodes(task_device()),
        scratch_mb=sizes.scratch_mb,
        file_mb=sizes.file_mb,
    )


def _more_files() -> None:
    """Room for a descriptor per bound image file while the sandbox is built (the soft limit raised to the hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _isolated(site: SiteConfig, images: list[Path], sizes: argparse.Namespace) -> tuple[bool, bool] | None:
    """Sandbox, Landlock and seccomp, in that order; (sandboxed, confined), or None: refuse to start."""
    _more_files()
    sandboxed = _isolate(
        lambda: enter(_sandbox(site, images, sizes)),
        sandbox_allowed(),
        ENV_ALLOW_SANDBOX,
        "runs without its sandbox (namespaces, a root of its own, no privileges)",
    )
    if sandboxed is None:
        return None
    if not sandboxed:  # the host's network at least, where a namespace of its own is possible
        _isolate(drop_network, True, ENV_ALLOW_SANDBOX, "keeps the host's network")
    confined = _isolate(
        lambda: confine_files(*site_paths(site.root, images)),
        files_allowed(),
        ENV_ALLOW_FILES,
        "can read this host's files",
    )
    if confined is None:
        return None
    filtered = _isolate(install_seccomp, sandbox_allowed(), ENV_ALLOW_SANDBOX, "may make any system call")
    if filtered is None:
        return None
    return sandboxed, confined


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m site_agent.tasks.worker")
    parser.add_argument("site_dir", type=Path)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--bind-fd", type=int, default=None, help="the files of one run to bind (a sealed list)")
    parser.add_argument("--scratch-mb", type=int, default=None, help="its scratch: a tmpfs of this size (MiB)")
    parser.add_argument("--file-mb", type=int, default=None, help="the largest file it may write (MiB)")
    parser.add_argument(
        "--cgroup", type=Path, action="append", default=[], help="its own cgroup, joined first (v2: one; v1: two)"
    )
    args = parser.parse_args(argv)
    for group in args.cgroup:  # its memory and processes counted together
        if why := join(group):
            print(f"WARNING: the task process is not in its cgroup {group} ({why}): RLIMIT_DATA holds",
                  file=sys.stderr, flush=True)  # fmt: skip
    parent = os.getppid()
    site = SiteConfig(root=args.site_dir.resolve(), name="")  # its folder only: the catalog stays with the agent
    images = bound_files(args.bind_fd)  # one run's case files, read by path: bound into the sandbox (a spare: none)
    isolated = _isolated(site, images, args)  # from here on, in the sandbox (PID 1 of its own namespace)
    if isolated is None:
        return ISOLATION_REFUSED
    sandboxed, confined = isolated
    os.environ.update(TMPDIR="/tmp" if sandboxed else str(site.root / "scratch"), HOME="/tmp")
    if not sandboxed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    _yield_cpu()
    # what loads numpy (whose BLAS starts threads) only now, in the sandbox: it was entered with one thread
    import torch  # once per run, before the first step
    import torch._dynamo  # noqa: F401 - torch imports it when a cell makes its first optimizer (~3 s): here, not in round 1

    from site_agent.tasks import runner  # noqa: F401 - loaded here, before the first step: its data is handed later

    if os.environ.get(ENV_THREADS):
        torch.set_num_threads(int(os.environ[ENV_THREADS]))
    device = task_device()
    try:
        check_with_torch(device)
        unusable = ""
    except DeviceError as exc:
        print(f"WARNING: {exc}", file=sys.stderr, flush=True)
        unusable = str(exc)
    conn = Connection(args.fd)
    conn.send_bytes(READY)
    return _serve(conn, site, confined, images, device, unusable)


def _serve(conn: Connection, site: SiteConfig, confined: bool, images: list[Path], device: str, unusable: str) -> int:
    """Take one run, then serve its steps, one at a time, until the agent closes the connection."""
    from flip_core.protocol import decode_request, encode_result

    session: TaskSession | None = None  # made when a run adopts this process, from what it is handed then
    me = os.getpid()
    while True:
        try:
            blob: bytes | bytearray = conn.recv_bytes()
        except EOFError:
            return 0
        if blob.startswith(ADOPT):  # from the agent when a run adopts this process, before its first step: once
            if session is not None:
                print("refusing a second run: a task process serves one run only", file=sys.stderr, flush=True)
                return ONE_RUN
            session = _taken(conn, blob, site, confined, images, device, unusable)
            if session is None:
                return ISOLATION_REFUSED
            conn.send_bytes(READY)
            continue
        if session is None:
            print("refusing a step: no run has adopted this task process", file=sys.stderr, flush=True)
            return ONE_RUN
        if blob.startswith(STEP):  # the step follows, read into a buffer of its own (writable, never copied again)
            blob = receive_sized(conn, blob)
        result = encode_result(session.step(decode_request(blob)), reserve=RESULT_RESERVE)
        if os.getpid() != me:  # a process the task forked came back here: only the task process answers
            os._exit(1)
        send_sized(conn, result)


def _taken(
    conn: Connection,
    blob: bytes | bytearray,
    site: SiteConfig,
    confined: bool,
    images: list[Path],
    device: str,
    unusable: str,
) -> TaskSession | None:
    """Become one run's task process: what the agent handed it for the run (its rows only, sealed in memory: read
    and its descriptor closed here), its memory limit and scratch folder (:func:`_adopt`). None: refused (its
    isolation could not be narrowed)."""
    from site_agent.tasks.runner import HandedRun, TaskSession

    settings = json.loads(blob[len(ADOPT) :])
    payload = receive(conn)  # the descriptor follows the message
    if not _adopt(site, settings, confined, images):
        return None
    known = run_site(site.root, settings)
    handed = HandedRun(next(iter(known.datasets), ""), str(settings.get("cohort") or ""), payload)
    # output to the agent, which keeps the log
    return TaskSession(known, sink=sys.stdout, handed=handed, device=device, unusable=unusable)


def _adopt(site: SiteConfig, settings: dict[str, Any], confined: bool, images: list[Path]) -> bool:
    """Become one run's task process: its memory limit, and its own scratch folder as the one place it
    may write (a second Landlock layer where the first held: no other run's scratch, no more of the
    site's scratch folder). False when that layer could not be added."""
    if settings.get("memory_mb") is not None:
        limit_memory(int(settings["memory_mb"]))
    scratch = Path(settings["scratch"])
    scratch.mkdir(mode=0o700, exist_ok=True)  # in the sandbox's own scratch (a tmpfs), where the agent's is not seen
    os.chdir(scratch)
    os.environ.update(TMPDIR=str(scratch), HOME=str(scratch))
    tempfile.tempdir = None  # tempfile reads TMPDIR again
    if not confined:
        return True
    try:
        confine_files(*site_paths(site.root, images, scratch))
    except IsolationError as exc:
        print(f"refusing the run: {exc}", file=sys.stderr, flush=True)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
