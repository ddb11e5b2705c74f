"""What a site announces of each dataset includes the projects its policy admits to it (the hub shows the dataset
to those projects alone): approved projects naming the dataset, or any dataset ("*"); never an unapproved one."""

from __future__ import annotations

from site_agent.disclosure.guard import announced
from site_agent.governance.policy import parse_policy


def test_a_dataset_is_announced_with_the_approved_projects_that_may_use_it() -> None:
    policy = parse_policy(
        "VA",
        {
            "projects": {
                "heart": {"approved": True, "datasets": ["heart-disease"]},
                "everything": {"approved": True, "datasets": ["*"]},
                "pending": {"approved": False, "datasets": ["*"]},
                "lungs": {"approved": True, "datasets": ["lung-ct"]},
            }
        },
    )
    assert policy.admitted("heart-disease") == ("everything", "heart")
    assert policy.admitted("lung-ct") == ("everything", "lungs")
    summary = {"name": "heart-disease", "rows": 303}
    assert announced(summary, 10, policy.admitted("heart-disease"))["projects"] == ["everything", "heart"]
    assert announced(summary, 10)["projects"] == []  # no project named: no project sees it
