"""Landlock and the other limits a task process takes on itself, and what a host gives it.

Called by the task process itself (``site_agent.tasks.worker``), in FLIP's own code, before it loads a
cell, after it has entered its sandbox (``site_agent.sandbox.namespaces``: namespaces, a root of its own, no
privileges; then ``site_agent.sandbox.seccomp``): it confines its file access with Landlock to what it needs
(Python and its libraries, the system files of :data:`SYSTEM_READ`, the site's scratch folder writable; nothing
else, not even inside its own root), and where the kernel has them, no TCP and no signal or abstract Unix
socket outside itself; when a run adopts it, a second layer narrows writing to that run's own scratch
folder; and it caps its data memory with a hard ``RLIMIT_DATA`` that task code cannot raise again (the fallback
where the host gives the agent no cgroups to make, ``site_agent.sandbox.cgroups``: it counts each process's
private memory, not its shared mappings, tmpfs pages or children together).
The site agent kills a task process at its time limit from outside. :func:`protections` says which
of these a host gives (``flip-site doctor``).

Landlock needs Linux 5.13 or later with Landlock enabled; the sandbox needs root or unprivileged user
namespaces, and libseccomp. Where one is missing the task process refuses to start unless the site
agent was started with ``FLIP_TASK_SANDBOX=allow`` or ``FLIP_TASK_FILES=allow``, which it logs as a
warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from flip_core.errors import FlipError

# new namespaces (linux/sched.h): the network's here, all of them in the sandbox (site_agent.sandbox.namespaces)
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP = 0x10000000, 0x20000000, 0x40000000, 0x02000000
ENV_ALLOW_SANDBOX = "FLIP_TASK_SANDBOX"
ENV_ALLOW_FILES = "FLIP_TASK_FILES"
ENV_NPROC = "FLIP_TASK_NPROC"
DEFAULT_NPROC = 1024  # processes and threads of a run (torch starts a few threads per core and loader)

# Landlock (linux/landlock.h); the syscall numbers are the same on x86_64 and aarch64
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1  # execute … make_sym
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4: handled and never allowed, so no TCP at all
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6: nothing outside the task's own domain
# What a task process reads of the host's system, found by tracing a real training task (the heart
# cell with torch and pandas, strace -e trace=%file): the dynamic loader's cache and the libraries,
# time zones, locale data, OpenSSL's configuration, the CPU topology torch sizes its thread pools by.
# The sandbox (site_agent.sandbox.namespaces) binds these read-only into the task's own root; Landlock allows them
# (and the few /proc files of its own) and nothing else. Besides these: Python's prefixes and import
# path and FLIP's packages (python_paths). The site's data is never among them: a run's rows are handed to it.
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/ssl",
    "/etc/alternatives",
    "/sys/devices/system/cpu",
)  # not /sys/fs/cgroup: the host's cgroup tree (its services, their limits and use) is none of a task's business
# read only through Landlock: the sandbox writes its own passwd and group, and mounts its own /proc
LANDLOCK_READ = ("/etc/passwd", "/etc/group", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/proc/stat")
SYSTEM_WRITE = ("/dev", "/tmp")  # the device nodes; /tmp is a private tmpfs in the sandbox (a spare's only)


class IsolationError(FlipError):
    """The task process could not be isolated; the message says what failed."""


class SandboxError(FlipError):
    """The sandbox could not be built; the message says which step failed."""


def drop_network() -> None:
    """Move this (still single-threaded) process into a network namespace of its own."""
    lib = libc()
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if lib.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise IsolationError(f"cannot leave the host's network (unshare: {os.strerror(err)})")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def _ruleset_attr(abi: int, handled_fs: int) -> tuple[_RulesetAttr, int]:
    """The ruleset for this kernel's ABI and the size the kernel expects for it."""
    if abi >= 6:
        return _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP, SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL), 24
    if abi >= 4:
        return _RulesetAttr(handled_fs, NET_BIND_TCP | NET_CONNECT_TCP, 0), 16
    return _RulesetAttr(handled_fs, 0, 0), 8


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@functools.lru_cache(maxsize=1)
def libc() -> ctypes.CDLL:
    """libc, found once: finding it runs ldconfig and needs a temporary folder, which a confined
    process (confining itself a second time) no longer reaches."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    version = libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def confine_files(read: list[Path], write: list[Path]) -> None:
    """From now on this process (and every thread and child it starts) reaches only ``read`` (read and
    execute) and ``write`` (anything) and what lies beneath them; paths that do not exist are skipped.
    Where the kernel has them (Landlock ABI 4 and 6) it also opens no TCP connection, signals no process
    and reaches no abstract Unix socket outside its own Landlock domain. Called again, it narrows further
    (a second layer): access needs every layer's consent."""
    abi = landlock_abi()
    if abi < 1:
        raise IsolationError("cannot confine the task's files (this kernel has no Landlock)")
    handled = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    lib = libc()
    attr, size = _ruleset_attr(abi, handled)
    ruleset = lib.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), size, 0)
    if ruleset < 0:
        raise IsolationError(f"cannot confine the task's files (landlock: {os.strerror(ctypes.get_errno())})")
    try:
        for paths, rights in ((read, FS_EXECUTE | FS_READ_FILE | FS_READ_DIR), (write, handled)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    allowed = rights if os.path.isdir(path) else rights & file_rights
                    rule = _PathBeneath(allowed, fd)
                    if (
                        lib.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                        != 0
                    ):
                        raise IsolationError(f"cannot allow {path} (landlock: {os.strerror(ctypes.get_errno())})")
                finally:
                    os.close(fd)
        if lib.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or lib.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0:
            raise IsolationError(f"cannot confine the task's files (landlock: {os.strerror(ctypes.get_errno())})")
    finally:
        os.close(ruleset)


def python_paths() -> list[Path]:
    """Where this Python and its libraries live (read-only for the task): its prefixes, its import path
    and FLIP's own packages (an editable install is not on the import path). Not ``sys.path[0]``: that is
    the folder the process started in (a task process's scratch folder), not part of the installation."""
    import flip_core
    import site_agent

    flip = [os.path.dirname(os.path.abspath(site_agent.__file__)), os.path.dirname(os.path.abspath(flip_core.__file__))]
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *flip, *sys.path[1:]}
    return sorted({Path(os.path.realpath(p)) for p in roots if p and os.path.exists(p)})


def site_paths(site_root: Path, datasets: list[Path], scratch: Path | None = None) -> tuple[list[Path], list[Path]]:
    """What a task process at this site may read, and write: Python, its libraries, the host's system
    files, its own process in /proc (read); its run's scratch folder and /dev (write) — a spare process,
    not yet a run's: the site's scratch folder and its private /tmp. ``datasets``: files it reads by path
    (a run's rows are handed to it; a cell's image readers open its own cases' image files by path). Never the site's
    logs: the agent writes them."""
    read = [*python_paths(), *map(Path, SYSTEM_READ), *map(Path, LANDLOCK_READ), *datasets]
    if scratch is not None:
        return read, [scratch, Path("/dev")]
    return read, [site_root / "scratch", *map(Path, SYSTEM_WRITE)]


def files_allowed() -> bool:
    """The site admin let task processes keep the host's files (a host without Landlock)."""
    return os.environ.get(ENV_ALLOW_FILES, "") == "allow"


def sandbox_allowed() -> bool:
    """The site admin let task processes run without their sandbox (a host without namespaces or seccomp)."""
    return os.environ.get(ENV_ALLOW_SANDBOX, "") == "allow"


def limit_memory(megabytes: int) -> None:
    """Cap this process's data memory (heap and private mappings) for good: soft and hard limit."""
    limit = int(megabytes) * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


_PROBE = """
import ctypes, os, socket, sys, tempfile
from pathlib import Path
from site_agent import sandbox
from site_agent.sandbox import isolation
scratch = Path(tempfile.mkdtemp(prefix="flip-probe-"))
scratch.chmod(0o777)
steps = (
    ("sandbox", lambda: sandbox.enter(sandbox.Sandbox(
        read=tuple(map(Path, isolation.SYSTEM_READ)) + tuple(isolation.python_paths()), write=(scratch,),
        user=sandbox.task_user(), scratch_mb=1, file_mb=2))),
    ("files", lambda: isolation.confine_files(*isolation.site_paths(scratch.parent, [], scratch))),
    ("seccomp", sandbox.install_seccomp),
)
for name, step in steps:
    try:
        step()
        print(name, "ok", flush=True)
    except Exception as exc:
        print(name, str(exc).replace(chr(10), " "), flush=True)
(scratch / "written").write_text("ok")
print("writes", "ok", flush=True)
def refused(call):
    try:
        call()
    except OSError as exc:
        return exc.errno
    return 0
def shown(path):
    try:
        return bool(os.listdir(path) if os.path.isdir(path) else open(path).read(1))
    except OSError:
        return False
print("quota", "ok" if refused(lambda: (scratch / "fill").write_bytes(bytes(3 << 19))) == 28 else "no scratch quota")
print("file_size", "ok" if refused(lambda: Path("/dev/shm/big").write_bytes(bytes(3 << 20))) == 27 else "no file limit")
own = Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
print("processes", "ok" if own else "its user's process limit is shared with every task process of this host")
views = [path for path in ("/sys/fs/cgroup", "/proc/cmdline", "/proc/sys/kernel", "/proc/pressure") if shown(path)]
print("views", "ok" if not views else "the host's " + ", ".join(views) + " in view")
libc = ctypes.CDLL(None, use_errno=True)
ring = libc.syscall(425, 1, None) == -1 and ctypes.get_errno() == 1  # io_uring_setup: EPERM
print("doors", "ok" if ring and refused(lambda: socket.socket(socket.AF_VSOCK)) else "io_uring or vsock open")
"""
REQUIRED = ("sandbox", "files", "seccomp", "writes")  # without which a task process refuses to start
LIMITED = ("quota", "file_size", "processes", "views", "doors")  # what the sandbox's limits give, where it holds


def probe_steps() -> dict[str, str]:
    """Each isolation step tried in a child as a task process takes it: "" where it held, else why not."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60)
    said = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    failure = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
    return {step: "" if said.get(step) == "ok" else said.get(step, failure) for step in (*REQUIRED, *LIMITED)}


def probe() -> str:
    """Why task processes on this host cannot be isolated ("" when they can)."""
    steps = probe_steps()
    return next((f"{step}: {why}" for step, why in steps.items() if why and step in REQUIRED), "")


@dataclass(frozen=True)
class Protection:
    """One protection of a task process, whether this host gives it, and what it means."""

    name: str
    holds: bool
    what: str


def protections(steps: dict[str, str] | None = None) -> list[Protection]:
    """What this host gives a task process (``steps``: :func:`probe_steps`'s answer, tried now if not given)."""
    found = probe_steps() if steps is None else steps
    abi = landlock_abi()
    boxed, confined, filtered = not found["sandbox"], not found["files"] and abi >= 1, not found["seccomp"]
    user = "the task user (FLIP_TASK_USER, default nobody)" if os.geteuid() == 0 else "the agent's own user"
    return [
        Protection(
            "sandbox",
            boxed,
            "its own mount, PID, network, IPC and UTS namespaces and a root of its own: "
            "Python and the system libraries read-only, nothing else of the host (no host sockets)",
        ),
        Protection("user", boxed, f"runs as {user}, with no capabilities and no_new_privs"),
        Protection("network", boxed, "no route to the hospital or the internet"),
        Protection(
            "files",
            confined,
            f"Landlock (ABI {abi}) inside that root as well: only Python, the system "
            "files and its scratch folder; a run is handed its own rows only, sealed in memory",
        ),
        *_limits(found, boxed, confined),
        Protection(
            "seccomp",
            filtered,
            "refuses ptrace, mount, bpf, keyctl, kexec, reboot, module loading, new namespaces, io_uring and "
            "every socket but its own Unix ones (no netlink, vsock, packet or IP socket)",
        ),
        Protection("tcp", confined and abi >= 4, "no TCP connection or listening socket at all (Landlock ABI 4)"),
        Protection(
            "scoped",
            confined and abi >= 6,
            "no signal to, and no abstract Unix socket of, any process outside the task (Landlock ABI 6)",
        ),
        Protection(
            "time", True, "killed at its time limit per step (time_limit_seconds); idle ones only between steps"
        ),
    ]


def _limits(found: dict[str, str], boxed: bool, confined: bool) -> list[Protection]:
    """The rows of the limits that hold per run and per site (``[policy]``'s, and the process limit)."""
    from site_agent.sandbox.cgroups import usable

    grouped = usable()
    memory = (
        f"a {grouped} group per task process: its memory limit counts the run's shared mappings, tmpfs pages (its "
        "scratch too) and children together (memory_limit_mb), its pids limit its processes"
        if grouped
        else "fallback (no cgroup this agent may make here): a hard data-memory limit per process "
        "(RLIMIT_DATA, memory_limit_mb), which counts neither shared mappings, tmpfs pages nor children together"
    )
    processes = (
        "in a user namespace of its own: its processes and threads counted apart from every other run's and site's"
        if not found["processes"]
        else "fallback: " + found["processes"]
    )
    return [
        Protection(
            "processes",
            boxed and not found["processes"],
            f"at most {process_limit()} processes and threads a run, {processes} (FLIP_TASK_NPROC)",
        ),  # fmt: skip
        Protection(
            "scratch",
            confined and not found["quota"],
            "a scratch folder of its own per run, the one place it writes: a tmpfs of scratch_limit_mb "
            "(default 1024 MiB, in memory), gone when the run ends (without the sandbox: the host's disk)",
        ),
        Protection("filesize", not found["file_size"], "no file larger than file_limit_mb (RLIMIT_FSIZE, 512 MiB)"),
        Protection("runs", True, "at most runs_limit runs (8) with a task process here at once; one more is refused"),
        Protection(
            "views",
            boxed and not found["views"],
            "no /sys/fs/cgroup; /proc shows its own process and the CPUs, memory and CPU times only",
        ),  # fmt: skip
        Protection(
            "result",
            True,
            "its result read in bounded chunks under a cap (the step's size and 1 MiB, or result_limit_mb) "
            "and by the step's time limit: an announced size past it is refused before it is allocated",
        ),
        Protection(
            "logs",
            True,
            "its output reaches the site's log through the agent, at most log_limit_lines (100000) and "
            "log_limit_mb (8 MiB) a step; the log folder is out of its view",
        ),
        Protection("memory", True, memory),
        Protection(
            "cgroup",
            bool(grouped),
            "cgroups the agent may make, with the memory and pids controllers (cgroup v2 delegated to it, or v1)",
        ),
    ]


def process_limit() -> int:
    """The processes and threads a task process may have (``FLIP_TASK_NPROC``, else :data:`DEFAULT_NPROC`)."""
    return int(os.environ.get(ENV_NPROC) or DEFAULT_NPROC)


def describe(found: list[Protection]) -> str:
    """The protections as one line for the agent's log."""
    return "; ".join(f"{p.name}: {'yes' if p.holds else 'NO'}" for p in found)
