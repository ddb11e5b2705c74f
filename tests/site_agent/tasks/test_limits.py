"""A site's limits as its agent keeps them (``site_agent.tasks.limits``): the reaper's rule, the one sentence of each
limit, the note of a cut log, the audit record of each limit reached."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.governance.audit import read_records, verify
from site_agent.governance.policy import TaskLimits
from site_agent.tasks.limits import IDLE_SECONDS, LIMITS, SiteLimits, idle_too_long
from site_agent.tasks.messages import RESULT_ROOM


@pytest.mark.parametrize(
    ("now", "last_used", "steps_running", "reaped"),
    [
        (1000.0, 0.0, 0, True),  # nothing ran in it for longer than the idle time
        (IDLE_SECONDS - 1, 0.0, 0, False),  # idle, not yet for long
        (5 * IDLE_SECONDS, 0.0, 1, False),  # a step started long ago is still running: its own time limit stops it
        (5 * IDLE_SECONDS, 4 * IDLE_SECONDS + 1, 0, False),  # its last step ended recently, however long it took
    ],
)
def test_a_task_process_is_reaped_only_when_no_step_runs_in_it_and_it_has_been_idle(
    now: float, last_used: float, steps_running: int, reaped: bool
) -> None:
    assert idle_too_long(now, last_used, steps_running) is reaped


def test_a_step_longer_than_the_idle_time_is_not_reaped_at_any_moment_of_it() -> None:
    started, limit = 0.0, 3 * 3600.0  # a project whose steps may run three hours
    moments = [started + m for m in range(0, int(limit), 30)]  # the reaper's every look during the step
    assert not any(idle_too_long(now, started, 1) for now in moments)


def test_each_limit_that_stops_a_step_has_one_sentence_naming_the_site_and_the_limit(tmp_path: Path) -> None:
    limits = SiteLimits("Leeds", tmp_path, TaskLimits(scratch_limit_mb=256, file_limit_mb=64))
    said = limits.failures
    stopping = {"ResultLimit", "ScratchLimit", "FileSizeLimit", "ProcessLimit", "MemoryLimit", "RunLimit"}
    assert set(said) == stopping <= set(LIMITS)
    assert all(len(sentences) == 1 and "Leeds" in sentences[0] for sentences in said.values())
    assert "256 MiB" in said["ScratchLimit"][0] and "64 MiB" in said["FileSizeLimit"][0]
    assert "the step's own size and 1 MiB" in said["ResultLimit"][0]
    fixed = SiteLimits("Leeds", tmp_path, TaskLimits(result_limit_mb=16)).failures["ResultLimit"][0]
    assert "16 MiB" in fixed


def test_a_results_cap_is_the_sites_setting_or_the_steps_size_and_room(tmp_path: Path) -> None:
    assert SiteLimits("Leeds", tmp_path, TaskLimits()).cap(bytes(500)) == 500 + RESULT_ROOM
    assert SiteLimits("Leeds", tmp_path, TaskLimits(result_limit_mb=2)).cap(bytes(500)) == 2 << 20


def test_a_cut_log_is_audited_and_noted_once_for_its_run(tmp_path: Path) -> None:
    limits = SiteLimits("Leeds", tmp_path, TaskLimits(log_limit_lines=10, log_limit_mb=0.5))
    limits.log_cut("r1")
    assert limits.notes("r1") == ("Leeds kept only the first 10 lines or 0.5 MiB of the step's output in its log",)
    assert limits.notes("r1") == ()  # told with the step it happened in, not again
    assert limits.notes("r2") == ()
    (record,) = read_records(tmp_path)
    assert (record["kind"], record["run"], record["limit"]) == ("limit", "r1", "log")
    assert record["setting"] == {"lines": 10, "mb": 0.5}


def test_every_limit_reached_is_a_record_in_the_hash_chain(tmp_path: Path) -> None:
    limits = SiteLimits("Leeds", tmp_path, TaskLimits())
    limits.reached("r1", "result", 1 << 20, "fit", 1)
    limits.reached("r2", "time", 6.0, "fit", 2)
    records = read_records(tmp_path)
    assert [(r["run"], r["limit"], r["setting"], r["phase"], r["round"]) for r in records] == [
        ("r1", "result", 1 << 20, "fit", 1),
        ("r2", "time", 6.0, "fit", 2),
    ]
    assert verify(tmp_path) == []
