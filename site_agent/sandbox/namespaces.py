"""The task process's sandbox: namespaces, a root of its own, no privileges, a process limit.

Built by the task process itself (``site_agent.tasks.worker``), in FLIP's own code, while it is still one
thread and before any task code exists in it, the way bubblewrap and nsjail build theirs:

1. new mount, PID, network, IPC and UTS namespaces (and a user namespace when the agent is not root);
2. a fork: the original process only waits and passes on the exit code; the child is PID 1 of its
   own PID namespace (no other process is visible or signalable) and dies with its parent;
3. a root of its own on a small tmpfs: the paths of :data:`SYSTEM_READ` and the installation
   (Python, its libraries, FLIP) bound read-only at the same places, the site's scratch folder
   writable, a fresh ``/proc``, five device nodes, a private ``/tmp`` and ``/dev/shm``; nothing else of the host exists
   there (no site keys, logs, tokens, home folders, other sites, host sockets such as Docker's);
4. no privileges: as root, it becomes the task user (``FLIP_TASK_USER``, default ``nobody``), with
   every capability gone from its bounding set; otherwise it keeps the agent's user and drops every
   capability its user namespace gave it; ``no_new_privs`` either way;
5. a limit on the processes and threads it may start (``RLIMIT_NPROC``).

Landlock (``site_agent.sandbox.isolation``) then narrows file access again inside that root, and
:func:`~site_agent.sandbox.seccomp.install_seccomp` refuses the system calls a training task never needs.
The site's dataset files are opened before, by the agent's user, and read through those descriptors
(:class:`~site_agent.sandbox.handed.HandedFiles`), so their modes need not let the task user read them.
"""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import resource
import select
import signal
from dataclasses import dataclass, field
from pathlib import Path

from site_agent.sandbox.isolation import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    SandboxError,
    libc,
)
from site_agent.sandbox.seccomp import load_seccomp

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
MNT_DETACH = 2
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 24, 38
SYSCALLS = {"x86_64": {"pivot_root": 155, "capset": 126}, "aarch64": {"pivot_root": 41, "capset": 91}}
ENV_TASK_USER = "FLIP_TASK_USER"
DEFAULT_TASK_USER = "nobody"
ENV_NPROC = "FLIP_TASK_NPROC"
DEFAULT_NPROC = 1024  # processes and threads of the task user (torch starts a few threads per core and loader)

WAIT_SECONDS = 0.5  # how often the waiting process looks for the site agent
NEW_ROOT = "/tmp"  # the new root is mounted over it, in the task's own mount namespace only
DEVICES = ("null", "zero", "full", "random", "urandom")


@dataclass(frozen=True)
class Sandbox:
    """What the task process will see: ``read`` bound read-only, ``write`` bound writable (both at the same
    paths as on the host), run as ``user`` (None: the agent's own user, in a user namespace), with at most
    ``nproc`` processes and threads."""

    read: tuple[Path, ...]
    write: tuple[Path, ...]
    user: tuple[int, int] | None = None
    nproc: int = field(default_factory=lambda: int(os.environ.get(ENV_NPROC) or DEFAULT_NPROC))
    hostname: str = "flip-task"
    devices: tuple[str, ...] = ()  # device nodes beside DEVICES (a GPU site's, site_agent.tasks.devices.device_nodes)


def task_user() -> tuple[int, int] | None:
    """The uid and gid a task process runs as: the task user when the agent is root, else None (its own)."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get(ENV_TASK_USER) or DEFAULT_TASK_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(f"the task user {name!r} ({ENV_TASK_USER}) does not exist on this host") from None
    if entry.pw_uid == 0:
        raise SandboxError(f"the task user {name!r} is root: tasks never run as root")
    return entry.pw_uid, entry.pw_gid


def _check(result: int, step: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"cannot {step} ({os.strerror(err)})")


def _syscall(name: str) -> int:
    table = SYSCALLS.get(platform.machine())
    if table is None:
        raise SandboxError(f"no sandbox for this machine ({platform.machine()})")
    return table[name]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    lib = libc()
    encoded = [None if v is None else v.encode() for v in (source, target, fstype, data)]
    _check(lib.mount(encoded[0], encoded[1], encoded[2], ctypes.c_ulong(flags), encoded[3]), f"mount {target}")


def _write_map(path: str, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)


def _unshare(box: Sandbox) -> None:
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWCGROUP
    uid, gid = os.getuid(), os.getgid()
    if box.user is None:  # not root: a user namespace, where this process may build its mounts
        flags |= CLONE_NEWUSER
    _check(libc().unshare(flags), "enter new namespaces")
    if box.user is None:
        _write_map("/proc/self/setgroups", "deny")
        _write_map("/proc/self/uid_map", f"0 {uid} 1")
        _write_map("/proc/self/gid_map", f"0 {gid} 1")


def _wait_for(child: int, agent: int) -> None:
    """The original process: wait for the sandboxed child and end with its exit code; if the site agent goes
    first, end the child (which dies with this process, PR_SET_PDEATHSIG)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os.kill(child, signal.SIGKILL))
    ended = os.pidfd_open(child)  # readable once the child has ended
    while not select.select([ended], [], [], WAIT_SECONDS)[0]:
        if os.getppid() != agent:  # the agent is gone: so is its task
            os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


@dataclass(frozen=True)
class _Source:
    """A path to bind into the root, held open: the root is built over ``/tmp``, which hides what lies there."""

    path: Path
    writable: bool
    kind: str  # "dir", "file" or "link"
    fd: int = -1
    link: str = ""

    @classmethod
    def of(cls, path: Path, writable: bool) -> _Source | None:
        if not os.path.lexists(path):
            return None
        if path.is_symlink():
            return cls(path, writable, "link", link=os.readlink(path))
        return cls(path, writable, "dir" if path.is_dir() else "file", os.open(path, os.O_PATH | os.O_CLOEXEC))


def _bind(sources: list[_Source], root: str) -> None:
    for source in sorted(sources, key=lambda s: len(s.path.parts)):  # parents before their children
        target = root + str(source.path)
        os.makedirs(target if source.kind == "dir" else os.path.dirname(target), exist_ok=True)
        if source.kind == "link":  # recreated as such (/lib -> usr/lib)
            if not os.path.lexists(target):
                os.symlink(source.link, target)
            continue
        if source.kind == "file":
            open(target, "a").close()
        _mount(f"/proc/self/fd/{source.fd}", target, None, MS_BIND | MS_REC)
        flags = MS_BIND | MS_REMOUNT | MS_NOSUID | MS_NODEV | (0 if source.writable else MS_RDONLY)
        _mount(None, target, None, flags)
        os.close(source.fd)


def _devices_and_proc(root: str, extra: tuple[str, ...] = ()) -> None:
    os.makedirs(root + "/dev", exist_ok=True)
    for node in (*(f"/dev/{name}" for name in DEVICES), *extra):
        target = root + node
        open(target, "a").close()
        _mount(node, target, None, MS_BIND)
    os.makedirs(root + "/dev/shm", exist_ok=True)
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=256m")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _accounts(root: str, user: tuple[int, int] | None) -> None:
    """A passwd and group that name only the task's user (torch and getpass look themselves up)."""
    uid, gid = user if user is not None else (0, 0)
    os.makedirs(root + "/etc", exist_ok=True)
    with open(root + "/etc/passwd", "w") as fh:
        fh.write(f"task:x:{uid}:{gid}:FLIP task:/nonexistent:/usr/sbin/nologin\n")
    with open(root + "/etc/group", "w") as fh:
        fh.write(f"task:x:{gid}:\n")


def _pivot(root: str) -> None:
    os.chdir(root)
    os.mkdir(".oldroot")
    _check(libc().syscall(_syscall("pivot_root"), b".", b".oldroot"), "change the root")
    os.chdir("/")
    _check(libc().umount2(b"/.oldroot", MNT_DETACH), "leave the host's root")
    os.rmdir("/.oldroot")
    _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_root(box: Sandbox) -> None:
    """The new root: a tmpfs mounted over ``/tmp`` in this mount namespace only (so nothing is made on the
    host), the sources bound into it through descriptors opened before it hid them."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host, nor back
    found = [_Source.of(p, False) for p in set(box.read)] + [_Source.of(p, True) for p in set(box.write)]
    sources = [s for s in found if s is not None]
    root = NEW_ROOT
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    os.makedirs(root + "/tmp")  # private: a spare's temporary files (a run writes to its scratch)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    _bind(sources, root)
    _devices_and_proc(root, box.devices)
    _accounts(root, box.user)
    _pivot(root)
    _check(libc().sethostname(box.hostname.encode(), len(box.hostname)), "name the host")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(box: Sandbox) -> None:
    lib = libc()
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):  # no capability can come back, not even through an executable
        _check(lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    if box.user is not None:
        uid, gid = box.user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # leaving uid 0 clears every capability
    else:  # inside our own user namespace: clear what it gave us
        header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
        _check(lib.syscall(_syscall("capset"), ctypes.byref(header), ctypes.byref(data)), "drop capabilities")
    _check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    resource.setrlimit(resource.RLIMIT_NPROC, (box.nproc, box.nproc))


def enter(box: Sandbox) -> None:
    """Enter the sandbox; returns in it (PID 1 of its namespace), never in the calling process, which waits
    and exits with the sandboxed one's code. Call while this process has one thread."""
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # namespaces (a user namespace above all) need a process with one thread
        raise SandboxError(f"the task process has {threads} threads before its sandbox (it must have one)")
    try:
        load_seccomp()  # loaded now, while the host's ldconfig is still at hand
    except SandboxError:
        pass  # install_seccomp says so, where the site's policy decides
    os.setsid()  # the agent stops a task by its process group: this one's
    agent = os.getppid()
    _unshare(box)
    alive_r, alive_w = os.pipe()  # the child reads EOF here once the waiting process is gone
    child = os.fork()
    if child != 0:
        os.close(alive_r)
        _wait_for(child, agent)
    os.close(alive_w)
    _build_root(box)
    _drop_privileges(box)
    # after the change of user, which clears it: die with the waiting process, and check it is still there
    _check(libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "die with the waiting process")
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(1)
