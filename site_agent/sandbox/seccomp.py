"""The system calls a task process refuses itself: seccomp, over the host's libseccomp (pyseccomp).

Loaded before the sandbox (``site_agent.sandbox.namespaces``: finding a library needs the host's ldconfig),
installed after it and Landlock, by the task process itself (``site_agent.tasks.worker``).
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from site_agent.sandbox.isolation import (
    CLONE_NEWCGROUP,
    CLONE_NEWIPC,
    CLONE_NEWNET,
    CLONE_NEWNS,
    CLONE_NEWPID,
    CLONE_NEWUSER,
    CLONE_NEWUTS,
    SandboxError,
)

# The system calls a training task never needs, refused with EPERM (one place; one test per class in
# tests/site_agent/sandbox/test_sandbox.py). New namespaces: unshare, setns, and clone/clone3 with a CLONE_NEW*
# flag (clone3's flags lie in a struct seccomp cannot read, so clone3 answers ENOSYS and the C library
# falls back to clone). io_uring: a second way to every system call, which seccomp cannot see through.
REFUSED = {
    "tracing": ("ptrace", "process_vm_readv", "process_vm_writev", "kcmp"),
    "mounts": (
        "mount",
        "umount2",
        "pivot_root",
        "chroot",
        "move_mount",
        "open_tree",
        "fsopen",
        "fsmount",
        "fsconfig",
        "fspick",
        "mount_setattr",
    ),
    "namespaces": ("unshare", "setns"),
    "kernel": (
        "bpf",
        "perf_event_open",
        "userfaultfd",
        "kexec_load",
        "kexec_file_load",
        "reboot",
        "init_module",
        "finit_module",
        "delete_module",
        "swapon",
        "swapoff",
        "acct",
        "syslog",
        "iopl",
        "ioperm",
        "quotactl",
        "vhangup",
        "lookup_dcookie",
    ),
    "keys": ("keyctl", "add_key", "request_key"),
    "clock": ("settimeofday", "clock_settime", "clock_adjtime", "adjtimex"),
    "handles": ("open_by_handle_at", "name_to_handle_at", "fanotify_init"),
    "io_uring": ("io_uring_setup", "io_uring_enter", "io_uring_register"),
}
# The one socket family a task needs: Unix sockets of its own (multiprocessing and torch's data loaders pass
# descriptors over them; Landlock keeps them inside the task where the kernel scopes them). Every other family
# (IP, which it has no route for anyway; netlink, the kernel's own interfaces; packet, vsock to the hypervisor,
# bluetooth, the kernel's crypto API, ...) is refused at socket() and socketpair() as missing: EAFNOSUPPORT.
SOCKET_FAMILIES = (socket.AF_UNIX,)
NEW_NAMESPACE_FLAGS = (
    CLONE_NEWNS,
    CLONE_NEWUSER,
    CLONE_NEWPID,
    CLONE_NEWNET,
    CLONE_NEWIPC,
    CLONE_NEWUTS,
    CLONE_NEWCGROUP,
)


def load_seccomp() -> Any:
    """pyseccomp (over the host's libseccomp), loaded before the sandbox: finding a library needs ldconfig."""
    try:
        import pyseccomp
    except (ImportError, OSError) as exc:  # no libseccomp on this host
        raise SandboxError(f"cannot filter system calls (libseccomp: {exc})") from None
    return pyseccomp


def install_seccomp() -> None:
    """Refuse :data:`REFUSED` from now on, in this process and every thread and child it starts."""
    seccomp = load_seccomp()
    refuse = seccomp.ERRNO(errno.EPERM)
    rules = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    for names in REFUSED.values():
        for name in names:
            try:
                rules.add_rule(refuse, name)
            except (ValueError, OSError):  # a call this architecture does not have
                continue
    for flag in NEW_NAMESPACE_FLAGS:
        rules.add_rule(refuse, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    (family,) = SOCKET_FAMILIES  # one family: the rule is "any other" (libseccomp ANDs the tests of one rule)
    for call in ("socket", "socketpair"):
        rules.add_rule(seccomp.ERRNO(errno.EAFNOSUPPORT), call, seccomp.Arg(0, seccomp.NE, family))
    rules.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    rules.load()
