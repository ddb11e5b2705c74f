"""Attacks on the characterisation of a cohort (issue 28): queries asked within a frozen cohort (its persons' age,
age group and year at their index date) and ``top`` (persons counted by the concepts they hold). A hostile
researcher tries to learn one person's concepts or a small count, to reach another project's cohort, or to make the
site name a concept only one person holds. The session's PostgreSQL with Eunomia's three hospitals
(``conftest.omop``); the site's query service answers the attacks' bytes as it answers the line's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flip_core.query import OTHER_LEVEL, QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus

from helpers import CELECOXIB, omop_site

pytestmark = pytest.mark.integration
SITE = "Westbrook"
THRESHOLD = 10  # the site's default disclosure threshold


@pytest.fixture(scope="module")
def service(omop: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    site = omop_site(omop, SITE, tmp_path_factory.mktemp("characterisation-attacks"))
    made = ask(site, QueryKind.COHORT, cohort="celecoxib", circe=json.dumps(CELECOXIB))
    assert made.status == StepStatus.OK, made.reason
    return site


def ask(service: Any, kind: QueryKind, project: str = "study", **fields: Any) -> Any:
    request = QueryRequest(f"q-{kind}-{len(str(fields))}", project, "mallory", "gibleed", kind, **fields)
    return decode_reply(service.answer(encode_query(request)))


def test_a_concept_fewer_persons_hold_than_the_threshold_is_never_named(omop: dict[str, Any], service: Any) -> None:
    """Every concept ``top`` names is held by at least the threshold's persons in the year up to their index date,
    however many concepts are asked for; rarer ones are only counted together, as "other"."""
    database = omop["databases"][SITE]
    with psycopg.connect(omop["server"].admin(database.database)) as admin:
        rare = {
            int(r[0])
            for r in admin.execute(
                "select condition_concept_id from cdm.condition_occurrence group by 1 "
                "having count(distinct person_id) < %s",
                [THRESHOLD],
            ).fetchall()
        }
    assert rare, "Eunomia holds conditions rarer than the threshold at this site"
    reply = ask(service, QueryKind.TOP, columns=("condition",), cohort="celecoxib", limit=1000)
    assert reply.status == StepStatus.OK, reply.reason
    (levels,) = reply.table["levels"]
    named = {int(label.rsplit("(", 1)[1].rstrip(")")) for label in levels if label != OTHER_LEVEL}
    assert named and not named & rare and OTHER_LEVEL in levels
    counts = dict(zip(levels, reply.table["cells"], strict=True))
    assert all(n is None or n >= THRESHOLD for label, n in counts.items() if label != OTHER_LEVEL)


def test_one_persons_concepts_are_not_told_by_a_filter_that_picks_them_out(service: Any) -> None:
    """A filter within the cohort that matches a handful of persons (one age group at its edge, one gender): every
    cell withheld, the total too, and no concept named for them alone."""
    reply = ask(service, QueryKind.TOP, columns=("condition",), cohort="celecoxib", limit=10,
                where="age >= 46 and gender = 'MALE'")  # fmt: skip
    assert reply.status in (StepStatus.OK, StepStatus.REFUSED), reply.reason
    if reply.status == StepStatus.OK:
        assert all(c is None for c in reply.table["cells"]) and reply.table["total"] is None
    counted = ask(service, QueryKind.COUNT, cohort="celecoxib", where="age >= 46 and gender = 'MALE'")
    assert counted.status == StepStatus.REFUSED or counted.table["total"] is None


def test_a_count_within_a_cohort_names_no_age_group_fewer_persons_hold_than_the_threshold(service: Any) -> None:
    reply = ask(service, QueryKind.COUNT, columns=("age",), cohort="celecoxib")
    assert reply.status == StepStatus.OK, reply.reason
    (levels,) = reply.table["levels"]
    assert OTHER_LEVEL in levels  # the oldest and youngest ages, too few to name, are counted together
    assert all(n is None or n >= THRESHOLD for n in reply.table["cells"])


def test_another_projects_cohort_and_a_cohort_changed_on_disk_are_refused(service: Any) -> None:
    other = ask(service, QueryKind.COUNT, project="elsewhere", columns=("gender",), cohort="celecoxib")
    assert other.status == StepStatus.REFUSED  # the site does not admit that project at all
    path = Path(service.site.root) / "cohorts" / "study" / "celecoxib.json"
    body = json.loads(path.read_text())
    saved = path.read_text()
    try:
        body["index"][0] = "1900-01-01"  # an index date moved: its person's age and year would change
        path.write_text(json.dumps(body))
        tampered = ask(service, QueryKind.COUNT, columns=("age_group",), cohort="celecoxib")
        assert tampered.status == StepStatus.REFUSED and "altered since it was made" in tampered.reason
    finally:
        path.write_text(saved)
    missing = ask(service, QueryKind.COUNT, columns=("gender",), cohort="no-such-cohort")
    assert missing.status == StepStatus.REFUSED and "there is no cohort 'no-such-cohort'" in missing.reason
