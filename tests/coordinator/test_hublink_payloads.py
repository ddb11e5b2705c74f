"""The round loop's payload calls wait out a coordinator that is briefly unreachable (a restart), and give up
with the reason once it stays away; a refusal is not retried."""

from __future__ import annotations

import pytest

from coordinator import hublink
from coordinator.hublink import HubLink
from flip_core.bulk import BulkError, BulkUnreachable


class FlakyBulk:
    """A fake payload client: unreachable for the first ``down`` calls, then it answers."""

    def __init__(self, down: int, refuse: bool = False) -> None:
        self.down, self.refuse, self.calls = down, refuse, 0

    def put(self, path: str, blob: bytes | bytearray) -> None:
        self.calls += 1
        if self.refuse:
            raise BulkError(f"PUT {path} was refused (413): the payload is too large")
        if self.calls <= self.down:
            raise BulkUnreachable(f"PUT {path} failed: ConnectionRefusedError")


def link(bulk: FlakyBulk) -> HubLink:
    made = HubLink("http://127.0.0.1:1", "internal")
    made.bulk = bulk  # type: ignore[assignment]
    return made


def test_a_publish_is_tried_again_while_the_coordinator_is_away() -> None:
    bulk = FlakyBulk(down=2)
    link(bulk).publish(b"x" * 10, "a" * 64, ["VA"])
    assert bulk.calls == 3


def test_a_coordinator_that_stays_away_or_refuses_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hublink, "RETRY_SECONDS", 0.0)
    with pytest.raises(BulkUnreachable, match="ConnectionRefusedError"):
        link(FlakyBulk(down=10)).publish(b"x", "a" * 64, ["VA"])
    refusing = FlakyBulk(down=0, refuse=True)
    with pytest.raises(BulkError, match="too large"):
        link(refusing).publish(b"x", "a" * 64, ["VA"])
    assert refusing.calls == 1  # a refusal is an answer: not asked again
