"""The task process's isolation, the mechanism only: its own namespaces and root (``namespaces``), Landlock and
its limits (``isolation``), the system calls it refuses (``seccomp``), the site's files handed to it open
(``handed``). What it is handed is the data's to say (``site_agent.data``): nothing here imports it.

The names a task process and the agent use are re-exported here."""

from site_agent.sandbox.handed import HandedFiles
from site_agent.sandbox.isolation import IsolationError, SandboxError
from site_agent.sandbox.namespaces import Sandbox, enter, task_user
from site_agent.sandbox.seccomp import REFUSED, install_seccomp

__all__ = [
    "REFUSED",
    "HandedFiles",
    "IsolationError",
    "Sandbox",
    "SandboxError",
    "enter",
    "install_seccomp",
    "task_user",
]
