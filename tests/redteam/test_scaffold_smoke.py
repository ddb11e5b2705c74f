"""Smoke test of the red team's scaffolding (temporary)."""

from __future__ import annotations

import pytest

from kit import hostile, still_serves

pytestmark = pytest.mark.integration


def test_printed_rows_stay_at_the_site(redteam) -> None:
    outcome = redteam.train(hostile("print('LEAK' + str(len(data.train)))"), "print-rows")
    assert outcome.status == "completed", outcome.said
    assert outcome.leaked() == []
    still_serves(redteam)
