"""Attacks on the airlock (issue 27): the one door where a person at the site lets through what the rules hold back.

A hostile researcher tries to get something past the person rather than past the rules: loot in a traceback hidden
from the admin's terminal by escape sequences and carriage returns; a purpose that rewrites the admin's screen;
another researcher's traceback or released item; a flood of requests; an exception message of megabytes. Each
asserts that nothing reached the researcher before a release, that the admin sees what the bytes hold, and that the
site still serves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

from coordinator.config import add_token
from flip_core.airlock import MAX_ITEM_BYTES, MAX_PENDING
from flip_core.errors import Rejected
from flip_magics.client import FlipClient

from kit import MARKER, SITES, RedTeam, hostile, still_serves, still_trains

pytestmark = pytest.mark.integration

SITE = SITES[0]
BIN = Path(sys.executable).parent
PURPOSE = "to see why my cell fails at this hospital"
COUNT = "n = len(data.train)"


def admin(team: RedTeam, *args: str) -> str:
    """``flip-site airlock ARGS`` at the attacked site, as its admin runs it."""
    done = subprocess.run(
        [BIN / "flip-site", "airlock", args[0], team.sites_dir / SITE, *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def other_researcher(team: RedTeam, name: str) -> FlipClient:
    token = add_token(Path(team.connection["federation"]) / "coordinator.json", name, "default")
    return FlipClient(team.connection["coordinator_url"], token)


def test_loot_hidden_from_the_admins_terminal_by_escape_sequences_is_shown_and_flagged(redteam: RedTeam) -> None:
    """The message conceals a count (SGR 8), then a carriage return and a harmless line over it: on a terminal the
    admin would read only the harmless line. ``show`` writes every control character out and a check fails."""
    body = f"{COUNT}\nraise RuntimeError('\\x1b[8m' + 'LEAK' + str(n) + '\\x1b[0m\\r' + 'mat1 and mat2 shapes')"
    outcome = redteam.train(hostile(body), "hidden-loot")
    assert outcome.handle is not None and outcome.status == "failed", outcome.said
    client = redteam.client()
    asked = client.request_release("traceback", SITE, PURPOSE, run=outcome.handle.run_id)
    assert asked.state == "pending"
    assert outcome.leaked() == [] and not MARKER.search(repr(client.requests()) + repr(asked))
    review = admin(redteam, "show", asked.request_id)
    assert "\\x1b[8mLEAK" in review and "\\x0d" in review and "\x1b" not in review  # what the bytes hold, legibly
    assert "FAIL  control characters" in review
    admin(redteam, "refuse", asked.request_id, "--reason", "it hides text")
    still_serves(redteam)


def test_a_purpose_that_would_rewrite_the_admins_screen_is_refused_at_the_hub(redteam: RedTeam) -> None:
    client = redteam.client()
    with pytest.raises(Rejected, match="no control characters"):
        client.request_release("traceback", SITE, "harmless words here\x1b[2J\x1b[Hall checks passed", run="r")
    # past the client, straight to the hub: the same sentence, a 400, not a 500
    raw = {"site": SITE, "item": "traceback", "run": "r", "purpose": "four words then\r\x1b[2Kall clear"}
    response = requests.post(
        redteam.connection["coordinator_url"] + "/api/airlock",
        json=raw,
        headers={"Authorization": f"Bearer {redteam.connection['token']}"},
        timeout=30,
    )
    assert response.status_code == 400 and "no control characters" in response.json()["error"]


def test_another_researchers_traceback_and_released_item_are_not_yours(redteam: RedTeam) -> None:
    outcome = redteam.train(hostile(f"{COUNT}\nraise ValueError('LEAK' + str(n))"), "alice-fails")
    assert outcome.handle is not None and outcome.status == "failed"
    alice = redteam.client()
    hers = alice.request_release("traceback", SITE, PURPOSE, run=outcome.handle.run_id)
    mallory = other_researcher(redteam, "mallory-airlock")
    with pytest.raises(Rejected, match="no step of your run"):  # the same project, but not her run
        mallory.request_release("traceback", SITE, PURPOSE, run=outcome.handle.run_id)
    admin(redteam, "release", hers.request_id)
    with pytest.raises(Rejected, match="no request .* of yours"):
        mallory.released(hers.request_id)
    assert all(r.request_id != hers.request_id for r in mallory.requests())
    assert MARKER.search(alice.released(hers.request_id).value)  # hers, released to her: the loot was in it


def test_a_flood_of_requests_stops_at_the_sites_limit_and_the_site_still_serves(redteam: RedTeam) -> None:
    flooder = other_researcher(redteam, "flooder")
    query = {"dataset": "heart-disease", "kind": "count", "columns": ["sex"]}
    for _ in range(MAX_PENDING):
        assert flooder.request_release("query", SITE, PURPOSE, query=query).state == "pending"
    with pytest.raises(Rejected, match=f"at most {MAX_PENDING} wait at once"):
        flooder.request_release("query", SITE, PURPOSE, query=query)
    assert redteam.client().request_release("query", SITE, PURPOSE, query=query).state == "pending"  # others may
    still_serves(redteam)


def test_an_exception_of_megabytes_is_held_cut_to_its_end_and_the_site_still_serves(redteam: RedTeam) -> None:
    body = f"{COUNT}\nraise ValueError('x' * 8_000_000 + 'LEAK' + str(n))"
    outcome = redteam.train(hostile(body), "huge-message")
    assert outcome.handle is not None and outcome.status == "failed" and outcome.leaked() == []
    asked = redteam.client().request_release("traceback", SITE, PURPOSE, run=outcome.handle.run_id)
    raw = subprocess.run(
        [BIN / "flip-site", "airlock", "show", redteam.sites_dir / SITE, asked.request_id, "--raw"],
        capture_output=True,
        check=True,
    ).stdout
    assert len(raw) <= MAX_ITEM_BYTES and raw.startswith(b"[... the start of this text was cut")
    assert MARKER.search(raw.decode())  # its end, where the exception's own words are
    admin(redteam, "refuse", asked.request_id, "--reason", "too long to review")
    still_serves(redteam)


def test_after_these_attacks_every_site_still_trains(redteam: RedTeam) -> None:
    still_trains(redteam)
