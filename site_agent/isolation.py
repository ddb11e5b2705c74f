"""What a task process gives up before any task code runs: the network, and memory beyond its limit.

Called by the task process itself (``site_agent.worker``), in FLIP's own code, before it loads
a cell: it leaves the host's network for a network namespace of its own (only a loopback
interface, down), and caps its data memory with a hard ``RLIMIT_DATA`` that task code cannot
raise again. The site agent kills a task process at its time limit from outside.

A network namespace needs root, or unprivileged user namespaces (most distributions; some
restrict them by policy). Where neither is available the task process refuses to start unless
the site agent was started with ``FLIP_TASK_NETWORK=allow``, which it logs as a warning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
ENV_ALLOW_NETWORK = "FLIP_TASK_NETWORK"


class IsolationError(Exception):
    """The task process could not be isolated; the message says what failed."""


def drop_network() -> None:
    """Move this (still single-threaded) process into a network namespace of its own."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise IsolationError(f"cannot leave the host's network (unshare: {os.strerror(err)})")


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
