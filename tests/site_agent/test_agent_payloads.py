"""The site agent's side of large payloads: a reply whose payload the hub will not take still answers, at once,
with a sentence (so the round loop marks the site failed instead of waiting); a small reply stays inline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flip_core.protocol import StepResult, encode_result
from flip_core.status import StepStatus
from flip_core.wire import bulk_reference, content_to_result
from site_agent.agent import SiteAgent
from site_agent.data.catalog import init_site

from fakes import FakeFlakyBulk


def agent(tmp_path: Path) -> SiteAgent:
    site = init_site(tmp_path / "VA", "VA")
    made = SiteAgent(site, "127.0.0.1:1", "http://127.0.0.1:1", "token", warm_seconds=0)
    made.bulk = FakeFlakyBulk(down=0, refuse=True)  # type: ignore[assignment]
    return made


def test_a_reply_whose_payload_the_hub_refuses_says_so_inline(tmp_path: Path) -> None:
    va = agent(tmp_path)
    big = encode_result(StepResult(site="VA", status=StepStatus.OK, params={"w": np.ones(400_000, np.float32)}))
    content = va._reply_content(big, query=False)
    assert va.bulk.calls == 1 and bulk_reference(content) is None  # tried, then a small reply instead
    said = content_to_result(content)
    assert said.status == StepStatus.ERROR and said.error_type == "PayloadRefused" and not said.params
    assert said.error_where == "the site agent (the hub did not take its reply's payload)"


def test_a_small_reply_never_touches_the_bulk_path(tmp_path: Path) -> None:
    va = agent(tmp_path)
    small = encode_result(StepResult(site="VA", status=StepStatus.OK, params={"w": np.ones(4, np.float32)}))
    content = va._reply_content(small, query=False)
    assert va.bulk.calls == 0 and content_to_result(content).status == StepStatus.OK
