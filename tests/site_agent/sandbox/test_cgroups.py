"""A cgroup per task process where the host delegates cgroup v2 (``site_agent.sandbox.cgroups``), over a tree of
plain files laid out as cgroupfs lays out its interface files (this host's own may be cgroup v1, or not ours)."""

from __future__ import annotations

import os
from pathlib import Path

from site_agent.sandbox.cgroups import AGENT_LEAF, TaskGroup, TaskGroups, available, describe, own_group


def delegated(tmp_path: Path, controllers: str = "cpu memory pids io") -> tuple[Path, Path]:
    """A cgroup v2 root holding the agent's group (``/system.slice/flip-site.service``), and its /proc cgroup file."""
    root = tmp_path / "cgroup"
    group = root / "system.slice" / "flip-site.service"
    group.mkdir(parents=True)
    (root / "cgroup.controllers").write_text(controllers + "\n")
    (group / "cgroup.controllers").write_text(controllers + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/system.slice/flip-site.service\n")
    return root, proc


def test_a_process_cgroup_v2_group_is_read_from_its_proc_file() -> None:
    assert own_group("0::/system.slice/x.service\n", Path("/cg")) == Path("/cg/system.slice/x.service")
    assert own_group("0::/\n", Path("/cg")) == Path("/cg")  # a container's own namespace
    assert own_group("4:memory:/a\n1:cpu:/\n", Path("/cg")) is None  # cgroup v1 only


def test_a_delegated_group_takes_the_agent_into_a_leaf_and_enables_memory_and_pids_below(tmp_path: Path) -> None:
    root, proc = delegated(tmp_path)
    groups = TaskGroups.open(root, proc)
    assert groups is not None and groups.base == root / "system.slice" / "flip-site.service"
    assert (groups.base / AGENT_LEAF / "cgroup.procs").read_text() == str(os.getpid())
    assert (groups.base / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert available(root) and "cgroup v2 group of its own" in describe(groups)


def test_without_the_controllers_or_cgroup_v2_the_fallback_holds(tmp_path: Path) -> None:
    root, proc = delegated(tmp_path, controllers="cpu io")
    assert TaskGroups.open(root, proc) is None and not available(root)
    proc.write_text("4:memory:/x\n")
    assert TaskGroups.open(*delegated(tmp_path / "v1")[:1], proc) is None
    assert "RLIMIT_DATA" in describe(None)


def test_a_task_processs_group_holds_its_processes_and_its_runs_memory_without_swap(tmp_path: Path) -> None:
    root, proc = delegated(tmp_path)
    groups = TaskGroups.open(root, proc)
    assert groups is not None
    group = groups.new(processes=256)
    (group.path / "memory.swap.max").write_text("max\n")  # as cgroupfs has it where swap is accounted
    group.limit_memory(1024)
    assert (group.path / "pids.max").read_text() == "256"
    assert (group.path / "memory.max").read_text() == str(1024 * 2**20)
    assert (group.path / "memory.swap.max").read_text() == "0"
    assert groups.new(processes=256).path != group.path  # one group per task process


def test_a_group_whose_process_passed_memory_max_says_so(tmp_path: Path) -> None:
    group = TaskGroup(tmp_path)
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 0\n")
    assert not group.out_of_memory()  # reclaimed at its limit, nothing killed
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 40\noom 2\noom_kill 1\n")
    assert group.out_of_memory()
    assert TaskGroup(tmp_path / "gone").events("memory.events") == {}


def test_the_groups_of_gone_task_processes_are_swept_and_busy_ones_left(tmp_path: Path) -> None:
    root, proc = delegated(tmp_path)
    groups = TaskGroups.open(root, proc)
    assert groups is not None
    empty, busy = groups.base / "flip-task-1-1", groups.base / "flip-task-1-2"
    empty.mkdir()
    busy.mkdir()
    (busy / "cgroup.procs").write_text("4242\n")  # a plain file stands for a process still in it
    groups.sweep()
    assert not empty.exists() and busy.exists()
