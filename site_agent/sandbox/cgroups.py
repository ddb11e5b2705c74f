"""A cgroup of its own per task process, where the host lets the site agent make them: cgroup v2, or cgroup v1's
``memory`` and ``pids`` hierarchies.

The group's memory limit counts everything the run's processes use (private and shared mappings, the pages of the
tmpfs they wrote, every child they start) and keeps it from moving out to swap; its process limit counts every
process and thread. The agent makes the group (:meth:`TaskGroups.new`) before it starts the task process, the task
process moves itself in as its first act (:func:`join`, before its sandbox), and the agent sets the run's memory
when a run adopts the process (:meth:`TaskGroup.limit_memory`).

- **cgroup v2** where ``/sys/fs/cgroup`` is cgroup v2, the agent's own group offers the ``memory`` and ``pids``
  controllers and it may write there (root, or a delegated group: systemd's ``Delegate=yes``); the agent then moves
  itself into a leaf of its group (``flip-agent``: cgroup v2 puts processes only in leaves of a group with
  controllers). ``memory.max``, ``memory.swap.max`` 0, ``pids.max``.
- **cgroup v1** where the host mounts the ``memory`` and ``pids`` hierarchies and the agent may make groups below
  its own in each (root, as on this project's development machine): ``memory.limit_in_bytes`` and
  ``memory.memsw.limit_in_bytes`` (where swap is accounted), ``pids.max``.

Elsewhere (no delegation, not root) the fallback holds: ``RLIMIT_DATA`` per process
(``site_agent.sandbox.isolation.limit_memory``: it counts neither shared mappings nor children together) and
``RLIMIT_NPROC`` per user namespace (``site_agent.sandbox.namespaces``).
"""

from __future__ import annotations

import itertools
import os
import select
import signal
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids")
AGENT_LEAF = "flip-agent"
PREFIX = "flip-task-"
EMPTY_SECONDS = 5.0  # how long a group's removal waits for the last of its processes to end
_names = itertools.count(1)


def available(root: Path = ROOT) -> bool:
    """Whether this host has cgroup v2 with the memory and pids controllers, or cgroup v1's memory and pids
    hierarchies (the agent still needs the right to make groups in them: :meth:`TaskGroups.open` says)."""
    try:
        if set(CONTROLLERS) <= set((root / "cgroup.controllers").read_text().split()):
            return True
    except OSError:
        pass
    return all((root / c / "cgroup.procs").exists() for c in CONTROLLERS)


def usable(root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> str:
    """Which cgroups an agent run as this process could make its task processes' groups in: "cgroup v2",
    "cgroup v1" or "" (none: the fallback holds). Changes nothing (``flip-site doctor`` asks)."""
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return ""
    base = own_group(text, root)
    try:
        if base is not None and set(CONTROLLERS) <= set((base / "cgroup.controllers").read_text().split()):
            return "cgroup v2" if os.access(base, os.W_OK) and os.access(base / "cgroup.procs", os.W_OK) else ""
    except OSError:
        pass
    return "cgroup v1" if TaskGroups._v1(text, root) is not None else ""


def own_group(proc_cgroup: str, root: Path = ROOT) -> Path | None:
    """The cgroup v2 group of a process, from its ``/proc/PID/cgroup`` text (None: it has none, cgroup v1 only)."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return root / line[3:].strip().lstrip("/")
    return None


def own_v1_groups(proc_cgroup: str, root: Path = ROOT) -> dict[str, Path]:
    """A process's cgroup v1 groups in the memory and pids hierarchies, from its ``/proc/PID/cgroup`` text."""
    found: dict[str, Path] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                if controller in CONTROLLERS:
                    found[controller] = root / controller / parts[2].strip().lstrip("/")
    return found


def join(group: Path) -> str:
    """Move this process into ``group`` (its threads with it): "" when it moved, else why not."""
    try:
        (group / "cgroup.procs").write_text("0")
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


def describe(groups: TaskGroups | None) -> str:
    """What holds a run's memory and processes at this agent, in words for its log."""
    if groups is None:
        return "RLIMIT_DATA per process and RLIMIT_NPROC per user namespace (no cgroup this agent may make here)"
    if groups.pids is None:
        return f"a cgroup v2 group of its own under {groups.base} (memory.max, pids.max)"
    return f"cgroup v1 groups of its own under {groups.base} (memory.limit_in_bytes) and {groups.pids} (pids.max)"


@dataclass(frozen=True)
class TaskGroup:
    """One task process's cgroup: ``path`` its group (cgroup v2) or its memory group (cgroup v1), ``pids`` its
    cgroup v1 pids group (None under cgroup v2: the same group)."""

    path: Path
    pids: Path | None = None

    @property
    def paths(self) -> tuple[Path, ...]:
        """The groups its task process joins."""
        return (self.path,) if self.pids is None else (self.path, self.pids)

    def limit_memory(self, megabytes: int) -> None:
        """The run's memory, all its processes together, shared mappings and tmpfs pages included; no swap."""
        size = str(int(megabytes) * 2**20)
        if self.pids is None:
            _write(self.path / "memory.max", size)
            if (self.path / "memory.swap.max").exists():
                _write(self.path / "memory.swap.max", "0")
            return
        _write(self.path / "memory.limit_in_bytes", size)
        if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory and swap together: no swap beyond it
            _write(self.path / "memory.memsw.limit_in_bytes", size)

    def events(self, name: str) -> dict[str, int]:
        """``memory.events``, ``pids.events`` or (cgroup v1) ``memory.oom_control`` as numbers (empty when
        unreadable)."""
        try:
            text = (self.path / name).read_text()
        except OSError:
            return {}
        found: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if value.strip().isdigit():
                found[key] = int(value)
        return found

    def out_of_memory(self) -> bool:
        """A process of the group was killed for passing its memory limit."""
        name = "memory.events" if self.pids is None else "memory.oom_control"
        return self.events(name).get("oom_kill", 0) > 0

    def remove(self) -> None:
        """End whatever is left in the group (its task process is over) and remove it once it is empty (one still
        busy after :data:`EMPTY_SECONDS` stays for :meth:`TaskGroups.sweep`)."""
        if self.pids is None:
            try:
                _write(self.path / "cgroup.kill", "1")  # Linux 5.14
            except OSError:
                pass
            self._wait_empty()
        else:
            self._kill_v1()
        for path in self.paths:
            try:
                path.rmdir()
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

    def _kill_v1(self) -> None:
        """cgroup v1 has no ``cgroup.kill`` and no event for an emptied group: kill what its ``cgroup.procs`` lists
        until it lists nothing (a fork racing the kill is listed on the next read), for at most
        :data:`EMPTY_SECONDS`."""
        deadline = time.monotonic() + EMPTY_SECONDS
        while time.monotonic() < deadline:
            left = _listed(self.paths)
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            time.sleep(0.01)  # the killed processes leave the group as the kernel reaps them


@dataclass(frozen=True)
class TaskGroups:
    """The site agent's cgroup, whose children are its task processes' groups: ``base`` its group (cgroup v2) or
    its memory group (cgroup v1), ``pids`` its cgroup v1 pids group."""

    base: Path
    pids: Path | None = None

    @classmethod
    def open(cls, root: Path = ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> TaskGroups | None:
        """The agent's groups made ready for task groups, or None where this host gives none: the fallback
        holds."""
        try:
            text = proc_cgroup.read_text()
        except OSError:
            return None
        groups = cls._v2(text, root) or cls._v1(text, root)
        if groups is not None:
            groups.sweep()
        return groups

    @classmethod
    def _v2(cls, text: str, root: Path) -> TaskGroups | None:
        """cgroup v2: the agent moved into its leaf, the controllers enabled for its children."""
        try:
            base = own_group(text, root)
            if base is None or not set(CONTROLLERS) <= set((base / "cgroup.controllers").read_text().split()):
                return None
            leaf = base / AGENT_LEAF
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in CONTROLLERS))
        except OSError:  # not cgroup v2, not ours to write, or processes other than the agent's in its group
            return None
        return cls(base)

    @classmethod
    def _v1(cls, text: str, root: Path) -> TaskGroups | None:
        """cgroup v1: the agent's own memory and pids groups, where it may make groups below them (it tries one)."""
        found = own_v1_groups(text, root)
        if set(found) != set(CONTROLLERS):
            return None
        groups = cls(found["memory"], found["pids"])
        try:
            probe = groups.new(processes=1)
        except OSError:
            return None
        probe.remove()
        return groups

    def new(self, processes: int) -> TaskGroup:
        """A group for one task process, with at most ``processes`` processes and threads."""
        name = f"{PREFIX}{os.getpid()}-{next(_names)}"
        path = self.base / name
        path.mkdir()
        if self.pids is None:
            _write(path / "pids.max", str(processes))
            return TaskGroup(path)
        try:
            (self.pids / name).mkdir()
            _write(self.pids / name / "pids.max", str(processes))
        except OSError:
            for made in (self.pids / name, path):
                try:
                    made.rmdir()
                except OSError:
                    pass
            raise
        return TaskGroup(path, self.pids / name)

    def sweep(self) -> None:
        """Remove the empty groups of task processes whose agent is gone (an earlier agent's, or one busy when
        closed). A live agent's are left alone, empty or not: on a cgroup v1 host every agent makes its groups in the
        same hierarchies, and one just made is empty until its task process joins it."""
        for base in (self.base,) if self.pids is None else (self.base, self.pids):
            for path in base.glob(f"{PREFIX}*"):
                if _agent_alive(path.name):
                    continue
                try:
                    path.rmdir()
                except OSError:
                    pass


def _agent_alive(name: str) -> bool:
    """Whether the agent that made the group ``name`` (``flip-task-PID-N``) is still running (this one is)."""
    pid = name[len(PREFIX) :].partition("-")[0]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # there, another user's
        return True
    return True


def _listed(paths: tuple[Path, ...]) -> list[int]:
    """The processes the groups at ``paths`` hold."""
    pids: set[int] = set()
    for path in paths:
        try:
            pids.update(int(line) for line in (path / "cgroup.procs").read_text().split())
        except (OSError, ValueError):
            pass
    return sorted(pids)


def _write(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
