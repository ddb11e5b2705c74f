"""The site's limits on every run's task process, read from ``site.toml``'s ``[policy]``
(``site_agent.governance.policy.TaskLimits``)."""

from __future__ import annotations

import pytest

from site_agent.governance.policy import PolicyError, TaskLimits, parse_policy


def test_a_site_that_sets_none_has_the_defaults() -> None:
    limits = parse_policy("Leeds", {}).limits
    assert limits == TaskLimits()
    assert (limits.result_limit_mb, limits.log_limit_mb, limits.log_limit_lines) == (None, 8.0, 100_000)
    assert (limits.scratch_limit_mb, limits.file_limit_mb, limits.runs_limit) == (1024, 512, 8)


def test_a_site_sets_its_own_in_policy() -> None:
    raw = {
        "policy": {
            "result_limit_mb": 64,
            "log_limit_mb": 1.5,
            "log_limit_lines": 500,
            "scratch_limit_mb": 4096,
            "file_limit_mb": 2048,
            "runs_limit": 3,
        }
    }
    assert parse_policy("Leeds", raw).limits == TaskLimits(64, 1.5, 500, 4096, 2048, 3)


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("scratch_limit_mb", 0, "[policy] scratch_limit_mb must be at least 1"),
        ("scratch_limit_mb", 1.5, "[policy] scratch_limit_mb must be a whole number"),
        ("file_limit_mb", "big", "[policy] file_limit_mb must be a whole number"),
        ("log_limit_lines", -1, "[policy] log_limit_lines must be at least 0"),
        ("result_limit_mb", 0.5, "[policy] result_limit_mb must be at least 1"),
        ("runs_limit", 0, "[policy] runs_limit must be at least 1"),
        ("result_limit", 5, "[policy] has unknown setting(s): result_limit"),
    ],
)
def test_a_wrong_limit_is_refused_in_a_sentence_naming_it(setting: str, value: object, says: str) -> None:
    with pytest.raises(PolicyError) as refused:
        parse_policy("Leeds", {"policy": {setting: value}})
    assert str(refused.value) == says
