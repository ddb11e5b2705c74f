"""The round loop's payload calls wait out a coordinator that is briefly unreachable (a restart), and give up
with the reason once it stays away; a refusal is not retried."""

from __future__ import annotations

import pytest

from coordinator import hublink
from coordinator.hublink import HubLink
from flip_core.bulk import BulkError, BulkUnreachable

from fakes import FakeFlakyBulk


def link(bulk: FakeFlakyBulk) -> HubLink:
    made = HubLink("http://127.0.0.1:1", "internal")
    made.bulk = bulk  # type: ignore[assignment]
    return made


def test_a_publish_is_tried_again_while_the_coordinator_is_away() -> None:
    bulk = FakeFlakyBulk(down=2)
    link(bulk).publish(b"x" * 10, "a" * 64, ["VA"])
    assert bulk.calls == 3


def test_a_coordinator_that_stays_away_or_refuses_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hublink, "RETRY_SECONDS", 0.0)
    with pytest.raises(BulkUnreachable, match="ConnectionRefusedError"):
        link(FakeFlakyBulk(down=10)).publish(b"x", "a" * 64, ["VA"])
    refusing = FakeFlakyBulk(down=0, refuse=True)
    with pytest.raises(BulkError, match="too large"):
        link(refusing).publish(b"x", "a" * 64, ["VA"])
    assert refusing.calls == 1  # a refusal is an answer: not asked again
