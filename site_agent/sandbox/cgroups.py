"""A cgroup of its own per task process, where the host delegates cgroup v2 to the site agent.

Its ``memory.max`` counts everything the run's processes use (private and shared mappings, the pages of the tmpfs
they wrote, every child they start) and ``memory.swap.max`` 0 keeps it from moving out to swap; its ``pids.max``
counts every process and thread. The agent makes the group (:meth:`TaskGroups.new`) before it starts the task
process, the task process moves itself in as its first act (:func:`join`, before its sandbox), and the agent sets the
run's memory when a run adopts the process (:meth:`TaskGroup.limit_memory`).

Available where ``/sys/fs/cgroup`` is cgroup v2, the agent's own group offers the ``memory`` and ``pids`` controllers
and it may write there (root, or a delegated group: systemd's ``Delegate=yes``); the agent then moves itself into a
leaf of its group (``flip-agent``: cgroup v2 puts processes only in leaves of a group with controllers). Elsewhere
(cgroup v1, no delegation, a group shared with other processes) the fallback holds: ``RLIMIT_DATA`` per process
(``site_agent.sandbox.isolation.limit_memory``: it counts neither shared mappings nor children together) and
``RLIMIT_NPROC`` per user namespace (``site_agent.sandbox.namespaces``).
"""

from __future__ import annotations

import itertools
import os
import select
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")
AGENT_LEAF = "flip-agent"
PREFIX = "flip-task-"
EMPTY_SECONDS = 5.0  # how long a group's removal waits for the last of its processes to end
_names = itertools.count(1)


def available(root: Path = ROOT) -> bool:
    """Whether this host has cgroup v2 with the memory and pids controllers (the agent still needs its own group
    delegated to it to use them: :meth:`TaskGroups.open` says)."""
    try:
        return set(CONTROLLERS) <= set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return False


def own_group(proc_cgroup: str, root: Path = ROOT) -> Path | None:
    """The cgroup v2 group of a process, from its ``/proc/PID/cgroup`` text (None: it has none, cgroup v1 only)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return root / line[3:].strip().lstrip("/")
    return None


def join(group: Path) -> str:
    """Move this process into ``group`` (its threads with it): "" when it moved, else why not."""
    try:
        (group / "cgroup.procs").write_text("0")
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def describe(groups: TaskGroups | None) -> str:
    """What holds a run's memory and processes at this agent, in words for its log."""
    if groups is not None:
        return f"a cgroup v2 group of its own under {groups.base} (memory.max, pids.max)"
    return "RLIMIT_DATA per process and RLIMIT_NPROC per user namespace (no delegated cgroup v2 here)"


@dataclass(frozen=True)
class TaskGroup:
    """One task process's cgroup."""

    path: Path

    def limit_memory(self, megabytes: int) -> None:
        """The run's memory, all its processes together, shared mappings and tmpfs pages included; no swap."""
        _write(self.path / "memory.max", str(int(megabytes) * 2**20))
        if (self.path / "memory.swap.max").exists():
            _write(self.path / "memory.swap.max", "0")

    def events(self, name: str) -> dict[str, int]:
        """``memory.events`` or ``pids.events`` as numbers (empty when unreadable)."""
        try:
            text = (self.path / name).read_text()
        except OSError:
            return {}
        return {key: int(value) for key, value in (line.split() for line in text.splitlines() if line.strip())}

    def out_of_memory(self) -> bool:
        """A process of the group was killed for passing ``memory.max``."""
        return self.events("memory.events").get("oom_kill", 0) > 0

    def remove(self) -> None:
        """End whatever is left in the group (its task process is over) and remove it once it is empty (one still
        busy after :data:`EMPTY_SECONDS` stays for :meth:`TaskGroups.sweep`)."""
        try:
            _write(self.path / "cgroup.kill", "1")  # Linux 5.14
        except OSError:
            pass
        self._wait_empty()
        try:
            self.path.rmdir()
        except OSError:
            pass

    def _wait_empty(self) -> None:
        """Until ``cgroup.events`` says the group holds no process (the kernel signals each change as POLLPRI)."""
        try:
            fd = os.open(self.path / "cgroup.events", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while b"populated 1" in os.pread(fd, 4096, 0):
                if not poller.poll(EMPTY_SECONDS * 1000):
                    return
        finally:
            os.close(fd)


@dataclass(frozen=True)
class TaskGroups:
    """The site agent's cgroup, whose children are its task processes' groups."""

    base: Path

    @classmethod
    def open(cls, root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> TaskGroups | None:
        """The agent's own group made ready for task groups (the agent moved into its leaf, the controllers
        enabled for its children), or None where this host gives none: the fallback holds."""
        try:
            base = own_group(proc_cgroup.read_text(), root)
            if base is None or not set(CONTROLLERS) <= set((base / "cgroup.controllers").read_text().split()):
                return None
            leaf = base / AGENT_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError:  # not cgroup v2, not ours to write, or processes other than the agent's in its group
            return None
        groups = cls(base)
        groups.sweep()
        return groups

    def new(self, processes: int) -> TaskGroup:
        """A group for one task process, with at most ``processes`` processes and threads."""
        path = self.base / f"{PREFIX}{os.getpid()}-{next(_names)}"
        path.mkdir()
        _write(path / "pids.max", str(processes))
        return TaskGroup(path)

    def sweep(self) -> None:
        """Remove the empty groups of task processes that are gone (an earlier agent's, or one busy when closed)."""
        for path in self.base.glob(f"{PREFIX}*"):
            try:
                path.rmdir()
            except OSError:
                pass


def _write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
