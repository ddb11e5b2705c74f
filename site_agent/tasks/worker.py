"""The warm task process: one per run at a site, started by the site agent.

It leaves the host's network first (``site_agent.sandbox``), confines its files, loads torch,
and once a run adopts it, takes the run's memory limit and its own scratch folder, loads the cell
and the site's split once, then serves the run's steps, one at a time, over the connection the
agent handed it (file descriptor ``--fd``). Its stdout and stderr are a pipe to the agent, which
writes them to the site's log; the task sees neither the log folder nor the hub.
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
from typing import Any

from site_agent.data.catalog import SiteConfig, load_site
from site_agent.data.formats import bound_files, handed_files
from site_agent.sandbox import HandedFiles, Sandbox, SandboxError, enter, install_seccomp, task_user
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
from site_agent.tasks.devices import DeviceError, check_with_torch, device_nodes, task_device
from site_agent.tasks.messages import ADOPT, ISOLATION_REFUSED, READY, RESULT_RESERVE, STEP, receive_sized, send_sized

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


def _sandbox(site: SiteConfig, images: list[Path]) -> Sandbox:
    """The task's view: the system files, the installation and the registered image files read-only, the site's
    scratch folder writable, the site's GPU if it chose one."""
    return Sandbox(
        read=tuple(map(Path, SYSTEM_READ)) + tuple(python_paths()) + tuple(images),
        write=(site.root / "scratch",),
        user=task_user(),
        devices=device_nodes(task_device()),
    )


def _more_files() -> None:
    """Room for a descriptor per bound image file while the sandbox is built (the soft limit raised to the hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _isolated(site: SiteConfig, images: list[Path]) -> tuple[bool, bool] | None:
    """Sandbox, Landlock and seccomp, in that order; (sandboxed, confined), or None: refuse to start."""
    _more_files()
    sandboxed = _isolate(
        lambda: enter(_sandbox(site, images)),
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
    args = parser.parse_args(argv)
    parent = os.getppid()
    site = load_site(args.site_dir)  # as the agent's user, on the host, before the sandbox
    handed = HandedFiles.open(handed_files(site))
    images = bound_files(site)  # read by path: bound into the sandbox
    isolated = _isolated(site, images)  # from here on, in the sandbox (PID 1 of its own namespace)
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

    from flip_core.protocol import decode_request, encode_result
    from site_agent.tasks.runner import TaskSession

    if os.environ.get(ENV_THREADS):
        torch.set_num_threads(int(os.environ[ENV_THREADS]))
    device = task_device()
    try:
        check_with_torch(device)
        unusable = ""
    except DeviceError as exc:
        print(f"WARNING: {exc}", file=sys.stderr, flush=True)
        unusable = str(exc)
    # output to the agent, which keeps the log
    session = TaskSession(site, sink=sys.stdout, opener=handed.opener, device=device, unusable=unusable)
    me = os.getpid()
    conn = Connection(args.fd)
    conn.send_bytes(READY)
    while True:
        try:
            blob: bytes | bytearray = conn.recv_bytes()
        except EOFError:
            return 0
        if blob.startswith(ADOPT):  # from the agent when a run adopts this process, before its first step
            settings = json.loads(blob[len(ADOPT) :])
            if not _adopt(site, settings, confined, images):
                return ISOLATION_REFUSED
            session.cohort = settings.get("cohort")
            conn.send_bytes(READY)
            continue
        if blob.startswith(STEP):  # the step follows, read into a buffer of its own (writable, never copied again)
            blob = receive_sized(conn, blob)
        result = encode_result(session.step(decode_request(blob)), reserve=RESULT_RESERVE)
        if os.getpid() != me:  # a process the task forked came back here: only the task process answers
            os._exit(1)
        send_sized(conn, result)


def _adopt(site: SiteConfig, settings: dict[str, Any], confined: bool, images: list[Path]) -> bool:
    """Become one run's task process: its memory limit, and its own scratch folder as the one place it
    may write (a second Landlock layer where the first held: no other run's scratch, no more of the
    site's scratch folder). False when that layer could not be added."""
    if settings.get("memory_mb") is not None:
        limit_memory(int(settings["memory_mb"]))
    scratch = Path(settings["scratch"])
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
