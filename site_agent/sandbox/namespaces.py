"""The task process's sandbox: namespaces, a root of its own, no privileges, a process limit.

Built by the task process itself (``site_agent.tasks.worker``), in FLIP's own code, while it is still one
thread and before any task code exists in it, the way bubblewrap and nsjail build theirs:

1. new mount, PID, network, IPC and UTS namespaces (and a user namespace when the agent is not root);
2. a fork: the original process only waits and passes on the exit code; the child is PID 1 of its
   own PID namespace (no other process is visible or signalable) and dies with its parent;
3. a root of its own on a small tmpfs: the paths of :data:`SYSTEM_READ` and the installation
   (Python, its libraries, FLIP) bound read-only at the same places, the site's scratch folder
   writable (a tmpfs of its own of ``scratch_mb``, where the site sets one: its scratch quota), a fresh ``/proc``
   with only the process's own entries and the few the task's libraries read (:data:`PROC_KEPT`), five device nodes,
   a private ``/tmp`` and ``/dev/shm``; nothing else of the host exists there (no site keys, logs, tokens, home
   folders, other sites, host sockets such as Docker's, no ``/sys/fs/cgroup``);
4. no privileges: as root, it becomes the task user (``FLIP_TASK_USER``, default ``nobody``) in a user namespace
   of its own (mapped to the same user outside, by the process that waits for it), with every capability gone
   from its bounding set; otherwise it keeps the agent's user and drops every capability its user namespace gave
   it; ``no_new_privs`` either way;
5. a limit on the processes and threads it may start (``RLIMIT_NPROC``), which the kernel counts per user *in a
   user namespace*: each task process has its own, so one run's threads never starve another run's, at this site or
   at another site on the same host, though every site's tasks run as the same task user; and a limit on the size
   of any file it writes (``RLIMIT_FSIZE``: a write past it fails with ``EFBIG``).

Landlock (``site_agent.sandbox.isolation``) then narrows file access again inside that root, and
:func:`~site_agent.sandbox.seccomp.install_seccomp` refuses the system calls a training task never needs.
The site's data is never opened here: when a run adopts the process, the agent hands it the run's own rows in a
sealed in-memory file (``site_agent.sandbox.handed``), so their files' modes need not let the task user read them.
"""

from __future__ import annotations

import ctypes
import os
import platform
import pwd
import resource
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

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
    process_limit,
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

WAIT_SECONDS = 0.5  # how often the waiting process looks for the site agent
# what a task sees of /proc beside its own process: what its libraries read (the CPUs, the memory, the CPU times:
# the trace behind SYSTEM_READ) and the links to its own entries; every other entry describes the host (its
# command line, load, pressure, disks, modules, cgroups, sysctls) and is hidden under an empty one
PROC_KEPT = frozenset({"self", "thread-self", "cpuinfo", "meminfo", "stat", "mounts", "net"})
INODES = 65536  # files a task's tmpfs may hold (their inodes take the kernel's memory, not the tmpfs's size)
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
    nproc: int = field(default_factory=process_limit)
    hostname: str = "flip-task"
    devices: tuple[str, ...] = ()  # device nodes beside DEVICES (a GPU site's, site_agent.tasks.devices.device_nodes)
    scratch_mb: int | None = None  # each ``write`` path a tmpfs of its own this size (None: the host's folder, bound)
    file_mb: int | None = None  # the largest file it may write (RLIMIT_FSIZE; None: no limit)


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


def _wait_for(child: int, agent: int) -> NoReturn:
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


def _bind(sources: list[_Source], root: str, box: Sandbox) -> None:
    for source in sorted(sources, key=lambda s: len(s.path.parts)):  # parents before their children
        target = root + str(source.path)
        os.makedirs(target if source.kind == "dir" else os.path.dirname(target), exist_ok=True)
        if source.writable and source.kind == "dir" and box.scratch_mb is not None:  # its own, of its size
            os.close(source.fd)
            _mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, _tmpfs_options(box, box.scratch_mb, "0700"))
            continue
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
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size=256m,nr_inodes={INODES}")
    os.makedirs(root + "/proc", exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _hide_host(root + "/proc")


def _hide_host(proc: str) -> None:
    """Every entry of ``proc`` that describes the host (not a process, not :data:`PROC_KEPT`) under an empty one:
    a folder under an empty read-only tmpfs, a file under ``/dev/null`` (the task cannot unmount either)."""
    for entry in os.scandir(proc):
        if entry.name.isdigit() or entry.name in PROC_KEPT or entry.is_symlink():
            continue
        if entry.is_dir(follow_symlinks=False):
            _mount("tmpfs", entry.path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,nr_inodes=1")
        else:
            _mount("/dev/null", entry.path, None, MS_BIND)


def _tmpfs_options(box: Sandbox, megabytes: int, mode: str) -> str:
    """A tmpfs of ``megabytes``, owned by the task user (where the agent is root)."""
    owner = "" if box.user is None else f",uid={box.user[0]},gid={box.user[1]}"
    return f"mode={mode},size={megabytes}m,nr_inodes={INODES}{owner}"


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
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size=64m,nr_inodes={INODES}")
    _bind(sources, root, box)
    _devices_and_proc(root, box.devices)
    _accounts(root, box.user)
    _pivot(root)
    _check(libc().sethostname(box.hostname.encode(), len(box.hostname)), "name the host")


def _close(*fds: int) -> None:
    for fd in fds:
        os.close(fd)


def _map_users(child: int, user: tuple[int, int], go: int, asked: int) -> None:
    """The waiting process (root, in the host's user namespace): once the child has a user namespace of its own,
    map the task user there to the same user outside (a map only a process privileged outside may write)."""
    entry = os.open(f"/proc/{child}", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # before the child's root hides it
    try:
        os.write(go, b"g")
        if os.read(asked, 1) != b"?":  # it has none (the host gives none), or it ended before it asked
            return
        uid, gid = user
        for name, line in (("uid_map", f"{uid} {uid} 1\n"), ("gid_map", f"{gid} {gid} 1\n")):
            fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=entry)
            try:
                os.write(fd, line.encode())
            except OSError:
                return  # the child finds no map and says so
            finally:
                os.close(fd)
        os.write(go, b"m")
    finally:
        os.close(entry)


def _own_users(ask: int, answer: int) -> None:
    """The child, root in the host's user namespace with its root built: a user namespace of its own, where its
    processes and threads are counted apart from every other task process's (RLIMIT_NPROC counts per user in a
    user namespace), the task user mapped in by the waiting process. Where the host gives no user namespace, the
    fallback: the task user's one count, shared by every task process of the host (said in the site's log)."""
    try:  # the namespace's processes count towards its creator's limit too: unlimited, as it is root's
        resource.setrlimit(resource.RLIMIT_NPROC, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):
        pass
    if libc().unshare(CLONE_NEWUSER) != 0:
        why = os.strerror(ctypes.get_errno())
        os.write(ask, b"-")
        print(f"WARNING: no user namespace of its own ({why}): its process limit is shared", file=sys.stderr)
        return
    os.write(ask, b"?")
    if os.read(answer, 1) != b"m":
        raise SandboxError("cannot map the task user into its user namespace")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_privileges(box: Sandbox, last: int) -> None:
    lib = libc()
    for cap in range(last + 1):  # no capability can come back, not even through an executable
        _check(lib.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    if box.user is not None:
        uid, gid = box.user
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    # clear what its user namespace gave it (leaving uid 0 does not: host root is no user of that namespace)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    _check(lib.syscall(_syscall("capset"), ctypes.byref(header), ctypes.byref(data)), "drop capabilities")
    _check(lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    resource.setrlimit(resource.RLIMIT_NPROC, (box.nproc, box.nproc))
    if box.file_mb is not None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (box.file_mb * 2**20, box.file_mb * 2**20))


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
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())  # read while the host's /proc is in view
    _unshare(box)
    alive_r, alive_w = os.pipe()  # the child reads EOF here once the waiting process is gone
    down, up = os.pipe(), os.pipe()  # the waiting process and the child, while it takes a user namespace
    child = os.fork()
    if child != 0:
        try:  # whatever happens here, this process only waits for the child: never a task process itself
            _close(alive_r, down[0], up[1])
            if box.user is not None:
                _map_users(child, box.user, down[1], up[0])
            _close(down[1], up[0])
        finally:
            _wait_for(child, agent)
    _close(alive_w, down[1], up[0])
    try:
        if box.user is not None:
            os.read(down[0], 1)  # the waiting process holds this child's /proc entry: the root may hide the host's
        _build_root(box)
        if box.user is not None:
            _own_users(up[1], down[0])
    finally:  # the waiting process stops waiting for a question (EOF) and watches the agent
        _close(down[0], up[1])
    _drop_privileges(box, last_cap)
    # after the change of user, which clears it: die with the waiting process, and check it is still there
    _check(libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "die with the waiting process")
    if select.select([alive_r], [], [], 0)[0]:
        os._exit(1)
