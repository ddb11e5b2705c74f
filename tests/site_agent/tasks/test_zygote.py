"""Task processes forked from the site's zygote (``site_agent.tasks.zygote``): real processes, torch loaded once.

A forked task process must be what a started one is: sandboxed, handed its run's rows only, ending with its own
exit code; it must hold nothing of the zygote's (its connection above all: through it a task could ask for
processes), and it must end with the zygote, which ends with its agent."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_adoption import site, trains_on_its_rows_then_refuses_a_second_run  # noqa: F401 - the fixture

from flip_core.util import wait_until
from site_agent.data.catalog import SiteConfig
from site_agent.tasks import service
from site_agent.tasks.process import Worker, task_environment
from site_agent.tasks.zygote import Forked, Zygote

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zygote]:
    root = tmp_path_factory.mktemp("zygote-site")
    os.environ["FLIP_HUB_TOKEN"] = "agent-secret-never-in-a-task"  # what the agent holds: the zygote must not
    try:
        started = Zygote(root, task_environment())
    finally:
        del os.environ["FLIP_HUB_TOKEN"]
    assert started.wait_ready(), "the zygote did not load (see logs/task-processes.log)"
    yield started
    started.close()


def family(pid: int) -> list[int]:
    """``pid`` and its descendants (the sandbox's waiting process and the sandboxed task process)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        queue.extend(map(int, children))
    return found


def open_files(pid: int) -> set[str]:
    """What each of ``pid``'s descriptors is (``socket:[inode]``, a path, ``pipe:[inode]``)."""
    seen = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            seen.add(os.readlink(fd))
        except OSError:
            continue
    return seen


def test_a_forked_task_process_trains_on_its_handed_rows_and_ends_with_its_own_code(
    zygote: Zygote,
    site: SiteConfig,  # noqa: F811
) -> None:
    worker = Worker(site.root, zygote=zygote)
    assert isinstance(worker.process, Forked)
    trains_on_its_rows_then_refuses_a_second_run(worker, site)


def test_a_forked_task_process_holds_nothing_of_the_zygotes(zygote: Zygote, tmp_path: Path) -> None:
    worker = Worker(tmp_path, zygote=zygote)
    try:
        worker.wait_ready()  # in its sandbox, torch loaded: every descriptor it keeps is open now
        zygotes = open_files(zygote.process.pid)
        assert any(f.startswith("socket:") for f in zygotes)  # its connection to the agent
        for pid in family(worker.process.pid):
            shared = open_files(pid) & zygotes - {"/dev/null"}  # each opens its own
            assert not shared, f"task process {pid} holds the zygote's {shared}"
            environment = Path(f"/proc/{pid}/environ").read_bytes()
            assert b"agent-secret" not in environment
        assert b"agent-secret" not in Path(f"/proc/{zygote.process.pid}/environ").read_bytes()
    finally:
        worker.kill()


def test_a_killed_forked_task_process_is_reported_killed(zygote: Zygote, tmp_path: Path) -> None:
    worker = Worker(tmp_path, zygote=zygote)
    worker.wait_ready()
    pids = family(worker.process.pid)
    assert len(pids) == 2  # the sandbox's waiting process and the task process, PID 1 of its namespace
    worker.kill()
    assert worker.process.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 30)


def test_its_task_processes_end_with_the_zygote(tmp_path: Path) -> None:
    own = Zygote(tmp_path, task_environment())
    assert own.wait_ready()
    worker = Worker(tmp_path, zygote=own)
    worker.wait_ready()
    pids = family(worker.process.pid)
    own.close()  # as when its agent goes
    assert own.process.poll() is not None
    assert worker.process.wait(30) == -signal.SIGKILL
    assert wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 30)
    worker.conn.close()


def test_a_warm_site_forks_its_task_processes_from_its_zygote_and_ends_it_when_it_closes(tmp_path: Path) -> None:
    tasks = service.TaskService("A", tmp_path, warm_seconds=60)
    try:
        tasks.warm_up()
        assert tasks.zygote is not None and tasks.zygote.alive()
        assert tasks.spare is not None and isinstance(tasks.spare.process, Forked)
        zygote = tasks.zygote.process
    finally:
        tasks.close()
    assert zygote.wait(30) is not None


def test_a_cold_site_starts_each_task_process_anew(tmp_path: Path) -> None:
    tasks = service.TaskService("A", tmp_path, warm_seconds=0)
    tasks.warm_up()
    assert tasks.zygote is None and tasks.spare is None
