"""A cgroup per task process where the host lets the agent make them (``site_agent.sandbox.cgroups``): cgroup v2 and
cgroup v1 over trees of plain files laid out as cgroupfs lays out its interface files, and the real kernel's where this
host lets the test make groups (cgroup v1 as root on this project's machines)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from site_agent.sandbox.cgroups import (
    AGENT_LEAF,
    TaskGroup,
    TaskGroups,
    available,
    describe,
    own_group,
    own_v1_groups,
    usable,
)


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
    empty, busy = groups.base / "flip-task-999999999-1", groups.base / "flip-task-999999999-2"  # an agent gone
    empty.mkdir()
    busy.mkdir()
    (busy / "cgroup.procs").write_text("4242\n")  # a plain file stands for a process still in it
    groups.sweep()
    assert not empty.exists() and busy.exists()


def v1_hierarchies(tmp_path: Path) -> tuple[Path, Path]:
    """cgroup v1's memory and pids hierarchies, the agent in ``/flip`` of the one and ``/`` of the other, and its /proc
    cgroup file."""
    root = tmp_path / "cgroup"
    for controller, group in (("memory", "flip"), ("pids", "")):
        (root / controller / group).mkdir(parents=True, exist_ok=True)
        (root / controller / "cgroup.procs").write_text("")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("9:name=systemd:/\n8:pids:/\n4:memory:/flip\n1:cpu,cpuacct:/\n0::/\n")
    return root, proc


def test_a_process_cgroup_v1_groups_are_read_from_its_proc_file() -> None:
    text = "8:pids:/a\n4:memory:/b/c\n3:cpu,cpuacct:/\n0::/\n"
    assert own_v1_groups(text, Path("/cg")) == {"pids": Path("/cg/pids/a"), "memory": Path("/cg/memory/b/c")}
    assert own_v1_groups("0::/\n", Path("/cg")) == {}


def test_cgroup_v1_gives_a_memory_and_a_pids_group_per_task_process(tmp_path: Path) -> None:
    root, proc = v1_hierarchies(tmp_path)
    groups = TaskGroups.open(root, proc)
    assert groups is not None and (groups.base, groups.pids) == (root / "memory" / "flip", root / "pids")
    assert available(root) and "cgroup v1" in describe(groups)
    assert list(groups.base.glob("flip-task-*")) == []  # the group it tried is gone
    group = groups.new(processes=256)
    assert group.paths == (group.path, group.pids) and group.path.parent == groups.base
    assert group.pids is not None and (group.pids / "pids.max").read_text() == "256"
    (group.path / "memory.memsw.limit_in_bytes").write_text("9223372036854771712\n")  # swap is accounted
    group.limit_memory(1024)
    assert (group.path / "memory.limit_in_bytes").read_text() == str(1024 * 2**20)
    assert (group.path / "memory.memsw.limit_in_bytes").read_text() == str(1024 * 2**20)


def test_a_cgroup_v1_group_whose_process_passed_its_limit_says_so(tmp_path: Path) -> None:
    group = TaskGroup(tmp_path, tmp_path / "pids")
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n")
    assert not group.out_of_memory()
    (tmp_path / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert group.out_of_memory()


def test_only_the_groups_of_agents_that_are_gone_are_swept(tmp_path: Path) -> None:
    # every agent on a cgroup v1 host makes its groups in the same hierarchies: one agent's sweep must leave another
    # live agent's new, still empty group alone
    root, proc = v1_hierarchies(tmp_path)
    groups = TaskGroups.open(root, proc)
    assert groups is not None
    live, dead = groups.base / f"flip-task-{os.getppid()}-1", groups.base / "flip-task-999999999-1"
    live.mkdir()
    dead.mkdir()
    groups.sweep()
    assert live.exists() and not dead.exists()


# a process that joins the groups named on its command line, then holds 80 MiB of shared memory (a memfd, which
# RLIMIT_DATA does not count) while a child it forked holds 80 MiB of its own: 160 MiB together, past 96 MiB
HOG = """
import os, sys
for path in sys.argv[1:]:
    with open(os.path.join(path, 'cgroup.procs'), 'w') as fh:
        fh.write('0')
chunk = b'x' * (8 << 20)
held = os.memfd_create('held')
pid = os.fork()
if pid == 0:
    kept = [bytes(bytearray(chunk)) for _ in range(10)]
    os._exit(0)
for _ in range(10):
    os.write(held, chunk)
_, status = os.waitpid(pid, 0)
sys.exit(3 if status else 0)
"""


def real_groups() -> TaskGroups | None:
    return TaskGroups.open()


def test_on_this_host_a_task_groups_memory_counts_its_children_and_shared_memory_together() -> None:
    # the real kernel's cgroups where the agent may make them (root on this project's machines: cgroup v1 here)
    groups = real_groups()
    if groups is None:
        pytest.skip("this host lets this process make no cgroup (the fallback holds: RLIMIT_DATA)")
    free = subprocess.run([sys.executable, "-c", HOG], capture_output=True, timeout=60)
    assert free.returncode == 0, free.stderr  # in no group of its own, it holds it all
    group = groups.new(processes=64)
    try:
        group.limit_memory(96)
        done = subprocess.run([sys.executable, "-c", HOG, *map(str, group.paths)], capture_output=True, timeout=60)
        assert done.returncode != 0 and group.out_of_memory(), done.stderr
    finally:
        group.remove()
    assert not any(path.exists() for path in group.paths)


def test_doctor_is_told_which_cgroups_an_agent_could_make_without_changing_any(tmp_path: Path) -> None:
    v2_root, v2_proc = delegated(tmp_path / "v2")
    (v2_root / "system.slice" / "flip-site.service" / "cgroup.procs").write_text("")  # as cgroupfs has it
    assert usable(v2_root, v2_proc) == "cgroup v2"
    assert not (v2_root / "system.slice" / "flip-site.service" / AGENT_LEAF).exists()  # nobody moved
    v1_root, v1_proc = v1_hierarchies(tmp_path / "v1")
    assert usable(v1_root, v1_proc) == "cgroup v1"
    assert list((v1_root / "memory" / "flip").iterdir()) == []  # the group it tried is gone
    bare_root, bare_proc = delegated(tmp_path / "bare", controllers="cpu io")
    assert usable(bare_root, bare_proc) == ""
