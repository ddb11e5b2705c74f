"""What a task process gives up before any task code runs: the network, the host's files, memory.

Called by the task process itself (``site_agent.worker``), in FLIP's own code, before it loads
a cell: it leaves the host's network for a network namespace of its own (only a loopback
interface, down); it confines its file access with Landlock to what it needs (Python and its
libraries, the site's own registered dataset files and splits read-only, its scratch and log
folders writable; nothing else of the host: not other sites, not the coordinator's files, not
home folders); and caps its data memory with a hard ``RLIMIT_DATA`` that task code cannot raise
again. The site agent kills a task process at its time limit from outside.

A network namespace needs root, or unprivileged user namespaces (most distributions; some
restrict them by policy); Landlock needs Linux 5.13 or later with Landlock enabled. Where
either is missing the task process refuses to start unless the site agent was started with
``FLIP_TASK_NETWORK=allow`` or ``FLIP_TASK_FILES=allow``, which it logs as a warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import sys
from pathlib import Path

from flip_core.errors import FlipError

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
ENV_ALLOW_NETWORK = "FLIP_TASK_NETWORK"
ENV_ALLOW_FILES = "FLIP_TASK_FILES"

# Landlock (linux/landlock.h); the syscall numbers are the same on x86_64 and aarch64
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ALL_V1 = (1 << 13) - 1  # execute … make_sym
FS_REFER, FS_TRUNCATE = 1 << 13, 1 << 14
# what the task may read besides Python, its libraries and its site's data (nothing private of the host)
SYSTEM_READ = (
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/sys/devices/system/cpu",
    "/sys/fs/cgroup",
)
SYSTEM_WRITE = ("/dev",)


class IsolationError(FlipError):
    """The task process could not be isolated; the message says what failed."""


def drop_network() -> None:
    """Move this (still single-threaded) process into a network namespace of its own."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise IsolationError(f"cannot leave the host's network (unshare: {os.strerror(err)})")


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version (0: none)."""
    version = _libc().syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return max(int(version), 0)


def confine_files(read: list[Path], write: list[Path]) -> None:
    """From now on this process (and every thread and child it starts) reaches only ``read`` (read and
    execute) and ``write`` (anything) and what lies beneath them; paths that do not exist are skipped."""
    abi = landlock_abi()
    if abi < 1:
        raise IsolationError("cannot confine the task's files (this kernel has no Landlock)")
    handled = FS_ALL_V1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    file_rights = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | (FS_TRUNCATE if abi >= 3 else 0)
    libc = _libc()
    attr = _RulesetAttr(handled)
    ruleset = libc.syscall(SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr), 0)
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
                        libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, LANDLOCK_RULE_PATH_BENEATH, ctypes.byref(rule), 0)
                        != 0
                    ):
                        raise IsolationError(f"cannot allow {path} (landlock: {os.strerror(ctypes.get_errno())})")
                finally:
                    os.close(fd)
        if (
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            or libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) != 0
        ):
            raise IsolationError(f"cannot confine the task's files (landlock: {os.strerror(ctypes.get_errno())})")
    finally:
        os.close(ruleset)


def python_paths() -> list[Path]:
    """Where this Python and its libraries live (read-only for the task)."""
    here = os.path.dirname(os.path.abspath(__file__))  # FLIP's site package (an editable install is not on sys.path)
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, here, *sys.path}
    return sorted({Path(os.path.realpath(p)) for p in roots if p and os.path.exists(p)})


def site_paths(site_root: Path, datasets: list[Path]) -> tuple[list[Path], list[Path]]:
    """What a task process at this site may read, and write: Python, its libraries, the host's system
    files, its own process in /proc, the site's catalog, splits and registered dataset files (read);
    the site's scratch and log folders and /dev (write)."""
    read = [
        *python_paths(),
        *map(Path, SYSTEM_READ),
        Path(f"/proc/{os.getpid()}"),
        site_root / "site.toml",
        site_root / "splits",
        *datasets,
    ]
    return read, [site_root / "scratch", site_root / "logs", *map(Path, SYSTEM_WRITE)]


def files_allowed() -> bool:
    """The site admin let task processes keep the host's files (a host without Landlock)."""
    return os.environ.get(ENV_ALLOW_FILES, "") == "allow"


def network_allowed() -> bool:
    """The site admin let task processes keep the host's network (a host without namespaces)."""
    return os.environ.get(ENV_ALLOW_NETWORK, "") == "allow"


def limit_memory(megabytes: int) -> None:
    """Cap this process's data memory (heap and private mappings) for good: soft and hard limit."""
    limit = int(megabytes) * 2**20
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def probe() -> str:
    """Why task processes on this host cannot be isolated ("" when they can), tried in a child."""
    import subprocess

    code = (
        "from site_agent.isolation import confine_files, drop_network, python_paths\n"
        "drop_network()\nconfine_files(python_paths(), [])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if done.returncode == 0:
        return ""
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit code {done.returncode}"
