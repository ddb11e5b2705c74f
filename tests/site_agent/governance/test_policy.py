"""The site policy's pure decisions: default deny, who/what/which code, DP demands and budget."""

from __future__ import annotations

import pytest

from site_agent.governance.policy import (
    ALLOW,
    PENDING,
    REFUSE,
    Approval,
    Budget,
    PolicyError,
    TaskFacts,
    decide,
    parse_policy,
)

HASH = "sha256:" + "ab" * 32


def policy(**project):
    return parse_policy(
        "VA",
        {"projects": {"heart": {"approved": True, "researchers": ["alice"], "datasets": ["heart-disease"], **project}}},
    )


def task(**changes):
    facts = {"project": "heart", "researcher": "alice", "dataset": "heart-disease", "source_hash": HASH}
    return TaskFacts(**{**facts, **changes})


def test_a_site_without_policy_refuses_everything() -> None:
    decision = decide(parse_policy("VA", {}), task())
    assert decision.verdict == REFUSE
    assert decision.reason == "project 'heart' is not approved at VA"


def test_a_listed_but_unapproved_project_is_refused() -> None:
    assert decide(policy(approved=False), task()).verdict == REFUSE


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"researcher": "mallory"}, "researcher 'mallory' may not run tasks of project 'heart' at VA"),
        ({"dataset": "oncology"}, "project 'heart' may not use dataset 'oncology' at VA"),
        ({"kind": "export"}, "export tasks are not allowed for project 'heart' at VA"),
    ],
)
def test_who_and_what_are_checked(changes, reason) -> None:
    decision = decide(policy(), task(**changes))
    assert (decision.verdict, decision.reason) == (REFUSE, reason)


def test_a_star_allows_any_researcher_and_dataset() -> None:
    open_policy = policy(researchers=["*"], datasets=["*"], auto_approve=True)
    assert decide(open_policy, task(researcher="bob", dataset="anything")).verdict == ALLOW


def test_code_waits_for_approval_then_runs_and_a_rejection_wins() -> None:
    strict = policy()
    assert decide(strict, task()).verdict == PENDING
    assert decide(strict, task()).reason == "waiting for approval at VA"
    assert decide(strict, task(), Approval("approved")).verdict == ALLOW
    rejected = decide(policy(auto_approve=True), task(), Approval("rejected", "uses the free-text notes column"))
    assert rejected.verdict == REFUSE
    assert rejected.reason == "VA rejected this code (sha256:abababababab): uses the free-text notes column"


def test_auto_approve_runs_unreviewed_code() -> None:
    assert decide(policy(auto_approve=True), task()).verdict == ALLOW


def test_dp_demands_and_budget_are_refused_with_the_figures() -> None:
    demanding = policy(auto_approve=True, dp_required=True, max_epsilon=8.0)
    assert decide(demanding, task()).reason == (
        "VA requires differential privacy for project 'heart' (set --dp-epsilon, at most 8)"
    )
    assert decide(demanding, task(dp_epsilon=2.0), budget=Budget(spent=6.0, after=7.9)).verdict == ALLOW
    spent = decide(demanding, task(dp_epsilon=2.5), budget=Budget(spent=6.0, after=8.25))
    assert spent.verdict == REFUSE
    assert spent.reason == (
        "the privacy budget of project 'heart' at VA is exhausted: epsilon 6 of 8 spent; "
        "this task (--dp-epsilon 2.5) would bring it to 8.25"
    )
    assert decide(policy(auto_approve=True), task(dp_epsilon=50.0), budget=Budget(0.0, 50.0)).verdict == ALLOW


def test_a_project_may_list_the_metrics_that_leave() -> None:
    site = parse_policy(
        "VA", {"projects": {"heart": {"approved": True, "metrics": ["loss", "auc"]}, "lungs": {"approved": True}}}
    )
    assert site.metrics("heart") == ("loss", "auc") and site.metrics("lungs") == ("*",)
    assert site.metrics("unknown") == ()


def test_thresholds_never_go_below_the_sites() -> None:
    site = parse_policy(
        "VA",
        {"policy": {"disclosure_threshold": 20}, "projects": {"heart": {"approved": True, "disclosure_threshold": 25}}},
    )
    assert site.threshold("heart") == 25
    assert site.threshold("unknown") == 20
    with pytest.raises(PolicyError, match=r"\[projects.heart\] disclosure_threshold 5 is below the site's 20"):
        parse_policy(
            "VA",
            {
                "policy": {"disclosure_threshold": 20},
                "projects": {"heart": {"approved": True, "disclosure_threshold": 5}},
            },
        )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"projects": {"heart": {"aproved": True}}}, r"\[projects.heart\] has unknown setting\(s\): aproved"),
        ({"projects": {"heart": {"approved": "yes"}}}, r"\[projects.heart\] approved must be true or false"),
        ({"projects": {"heart": {"researchers": "alice"}}}, r"researchers must be a list of names"),
        ({"projects": {"heart": {"tasks": ["train", "sql"]}}}, r"unknown kind\(s\) sql"),
        ({"projects": {"heart": {"max_epsilon": -1}}}, r"max_epsilon must be at least 0"),
        ({"projects": {"heart": {"dp_delta": 0.5e1}}}, r"dp_delta must be between 0 and 1"),
        ({"policy": {"threshold": 3}}, r"\[policy\] has unknown setting\(s\): threshold"),
    ],
)
def test_a_bad_policy_is_refused_with_where_and_why(raw, message) -> None:
    with pytest.raises(PolicyError, match=message):
        parse_policy("VA", raw)


def test_queries_are_their_own_kind_allowed_only_where_the_project_lists_them() -> None:
    refused = decide(policy(), task(kind="query", source_hash=""))
    assert refused.verdict == REFUSE and "query tasks are not allowed for project 'heart' at VA" in refused.reason
    allowed = decide(policy(tasks=["train", "query"]), task(kind="query", source_hash=""))
    assert allowed.verdict == ALLOW  # no code runs for a query: no approval to wait for
    other = decide(policy(tasks=["query"], researchers=["bob"]), task(kind="query", source_hash=""))
    assert other.verdict == REFUSE and "researcher 'alice'" in other.reason


def test_a_site_can_restrict_the_columns_a_project_may_query() -> None:
    from site_agent.governance.policy import query_columns_refused

    narrow = policy(tasks=["query"], query_columns=["age", "sex"])
    assert query_columns_refused(narrow, "heart", ("age",)) == ""
    sentence = query_columns_refused(narrow, "heart", ("age", "chol", "thal"))
    assert sentence == "project 'heart' may not query column(s) chol, thal at VA (it may query: age, sex)"
    assert query_columns_refused(policy(), "heart", ("chol",)) == ""  # the default: any column
    with pytest.raises(PolicyError, match="query_columns"):
        policy(query_columns="age")


def test_query_epsilon_needs_a_budget_it_fits_in() -> None:
    base = {"approved": True, "researchers": ["*"], "datasets": ["*"], "tasks": ["query"]}
    parsed = parse_policy("s", {"projects": {"p": {**base, "max_epsilon": 4.0, "query_epsilon": 0.5}}})
    assert parsed.project("p").query_epsilon == 0.5
    wrong = (
        {"query_epsilon": 0.5},
        {"max_epsilon": 1.0, "query_epsilon": 2.0},
        {"max_epsilon": 1.0, "query_epsilon": 0},
    )
    for body in wrong:
        with pytest.raises(PolicyError, match="query_epsilon"):
            parse_policy("s", {"projects": {"p": {**base, **body}}})


def test_count_noise_is_the_sites_and_a_project_may_only_raise_it() -> None:
    base = {"approved": True, "researchers": ["*"], "datasets": ["*"]}
    parsed = parse_policy("s", {"policy": {"count_noise": 3}, "projects": {"p": base, "q": {**base, "count_noise": 5}}})
    assert parsed.noise("p") == 3 and parsed.noise("q") == 5 and parsed.noise("unknown") == 3
    assert parse_policy("s", {}).noise("p") == 2  # the default
    with pytest.raises(PolicyError, match="below the site's 3"):
        parse_policy("s", {"policy": {"count_noise": 3}, "projects": {"p": {**base, "count_noise": 1}}})
    with pytest.raises(PolicyError, match="at most"):
        parse_policy("s", {"policy": {"count_noise": 500}})


def test_a_sites_limit_on_a_cohorts_rows_is_a_whole_number_of_at_least_one_or_none() -> None:
    assert parse_policy("s", {}).cohort_limit_rows is None
    assert parse_policy("s", {"policy": {"cohort_limit_rows": 5000}}).cohort_limit_rows == 5000
    for wrong in (0, 2.5, "many", True):
        with pytest.raises(PolicyError, match=r"\[policy\] cohort_limit_rows must be"):
            parse_policy("s", {"policy": {"cohort_limit_rows": wrong}})
