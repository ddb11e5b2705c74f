"""The task process's isolation, the mechanism only: its own namespaces and root (``namespaces``), Landlock and
its limits (``isolation``), the system calls it refuses (``seccomp``), what the agent hands it, sealed in memory
(``handed``), a cgroup of its own where the host delegates them (``cgroups``). What it is handed is the data's to
say (``site_agent.data``): nothing here imports it.

The names a task process and the agent use are re-exported here."""

from site_agent.sandbox.isolation import IsolationError, SandboxError, process_limit
from site_agent.sandbox.namespaces import Sandbox, enter, task_user
from site_agent.sandbox.seccomp import REFUSED, install_seccomp

__all__ = [
    "REFUSED",
    "IsolationError",
    "Sandbox",
    "SandboxError",
    "enter",
    "install_seccomp",
    "process_limit",
    "task_user",
]
