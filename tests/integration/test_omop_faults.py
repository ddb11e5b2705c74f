"""A slow OMOP database: the site answers within seconds that the database did not answer, naming itself, and
nothing hangs; once the database is quick again the same query is answered.

The slowness is real: a superuser holds an ACCESS EXCLUSIVE lock on the site's ``cdm.person`` (an open transaction,
as a long migration would), so every read of it by the site's read-only role waits until the source's statement
timeout cancels it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flip_core.query import QueryKind, QueryReply, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus

from helpers import CELECOXIB, omop_site

pytestmark = pytest.mark.integration
TIMEOUT_MS = 1500  # the source's statement timeout
BOUND_S = 10  # generous: a refusal comes after about one statement timeout, never a hang


@contextmanager
def person_table_locked(omop: dict[str, Any], site: str) -> Iterator[None]:
    """``site``'s database, slow: ``cdm.person`` locked by a superuser's open transaction until the block ends."""
    database = omop["databases"][site]
    with psycopg.connect(omop["server"].admin(database.database)) as admin:
        admin.execute("lock table cdm.person in access exclusive mode")  # the transaction stays open
        try:
            yield
        finally:
            admin.rollback()


def ask(service: Any, request: QueryRequest) -> tuple[QueryReply, float]:
    started = time.monotonic()
    reply = decode_reply(service.answer(encode_query(request)))
    return reply, time.monotonic() - started


def assert_did_not_answer(reply: QueryReply, seconds: float, site: str) -> None:
    assert reply.status == StepStatus.REFUSED, (reply.status, reply.reason)
    assert reply.site == site and reply.reason.startswith(f"{site}: "), reply.reason
    assert f"the database did not answer within {TIMEOUT_MS} ms" in reply.reason, reply.reason
    assert f"/{'omop_' + site.lower()})" in reply.reason, reply.reason  # which database: host:port/name
    assert seconds < BOUND_S, f"the refusal took {seconds:.1f} s"


def test_a_slow_database_is_named_within_seconds_and_answers_again_when_quick(
    omop: dict[str, Any], tmp_path: Path
) -> None:
    site = "Westbrook"
    service = omop_site(omop, site, tmp_path, statement_timeout_ms=TIMEOUT_MS)  # registered while the database is quick
    count = QueryRequest("q1", "study", "ada", "gibleed", QueryKind.COUNT, ("gender",), text="gibleed by gender")

    # the persons' table, read for the first query of the service: it waits on the lock until the timeout
    with person_table_locked(omop, site):
        reply, seconds = ask(service, count)
    assert_did_not_answer(reply, seconds, site)
    reply, _ = ask(service, count)
    assert reply.status == StepStatus.OK, reply.reason
    assert set(reply.table["levels"][0]) == {"MALE", "FEMALE"}

    # a Circe cohort's SQL runs in the database at every request: it waits on the lock until the timeout
    cohort = QueryRequest(
        "c1", "study", "ada", "gibleed", QueryKind.COHORT, cohort="celecoxib", circe=json.dumps(CELECOXIB)
    )
    with person_table_locked(omop, site):
        reply, seconds = ask(service, cohort)
    assert_did_not_answer(reply, seconds, site)
    assert "the cohort did not finish" in reply.reason, reply.reason
    reply, _ = ask(service, cohort)
    assert reply.status == StepStatus.OK, reply.reason
    assert reply.table["cohort"] == "celecoxib" and reply.table["total"] > 0
