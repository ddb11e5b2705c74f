"""Attacks on a hospital's own database (issue 28): a researcher who may send a Circe cohort definition tries to make
the site run SQL of theirs, or to change the database; the site's role tries to write. The session's PostgreSQL
with Eunomia's three hospitals (``conftest.omop``): no federation is needed for these, the site's query service
answers the attacks' bytes as it answers the line's.

Every attack asserts that the site refused in a sentence, that the database is as it was (its persons, its
drugs), and that the site still makes an honest cohort.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest

from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus
from site_agent.queries.cohorts import CohortRefused, CohortStore

from helpers import CELECOXIB, omop_site

pytestmark = pytest.mark.integration
SITE = "Riverside"


@pytest.fixture(scope="module")
def service(omop: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    return omop_site(omop, SITE, tmp_path_factory.mktemp("omop-attacks"))


def cohort(service: Any, definition: Any, name: str) -> Any:
    text = json.dumps(definition)
    request = QueryRequest(name, "study", "mallory", "gibleed", QueryKind.COHORT, cohort=name, circe=text)
    return decode_reply(service.answer(encode_query(request)))


def untouched(omop: dict[str, Any]) -> tuple[int, int]:
    database = omop["databases"][SITE]
    with psycopg.connect(omop["server"].admin(database.database)) as admin:
        persons = admin.execute("select count(*) from cdm.person").fetchone()
        drugs = admin.execute("select count(*) from cdm.drug_exposure").fetchone()
    assert persons is not None and drugs is not None
    return int(persons[0]), int(drugs[0])


def changed(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """CELECOXIB with the field at ``path`` set to ``value``."""
    definition: dict[str, Any] = json.loads(json.dumps(CELECOXIB))
    target: Any = definition
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return definition


CONCEPT = ("ConceptSets", 0, "expression", "items", 0, "concept", "CONCEPT_ID")


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (CONCEPT, "1118084) or (1=1", "CONCEPT_ID must be a whole number"),  # concept ids are written into SQL
        (CONCEPT, 1118084.5, "CONCEPT_ID must be a whole number"),
        (("ConceptSets", 0, "name"), "x'; drop table cdm.person; --", "quote, semicolon or backslash"),
        (("PrimaryCriteria", "ObservationWindow", "PriorDays"), "0) or (1=1", "cannot be rendered"),  # numbers as SQL
        (("PrimaryCriteria", "CriteriaList", 0, "DrugExposure", "CodesetId"), "0 or 1=1", "cannot be rendered"),
        (("CollapseSettings", "EraPad"), "0 + (select count(*) from pg_class)", "cannot be rendered"),
        (
            ("PrimaryCriteria", "CriteriaList", 0, "DrugExposure", "OccurrenceStartDate"),
            {"Value": "2000-01-01\\' or \\'1", "Op": "gt"},
            "quote, semicolon or backslash",
        ),  # fmt: skip
    ],
)
def test_a_definition_that_would_write_its_own_sql_is_refused(
    omop: dict[str, Any], service: Any, path: tuple[str | int, ...], value: Any, says: str
) -> None:
    before = untouched(omop)
    reply = cohort(service, changed(path, value), "injected")
    assert reply.status == StepStatus.REFUSED and says in reply.reason, reply.reason
    assert reply.table == {} and untouched(omop) == before


def test_a_definition_that_is_not_one_is_refused_in_a_sentence(omop: dict[str, Any], service: Any) -> None:
    for definition, says in (([1, 2], "JSON object"), ({"ConceptSets": []}, "no PrimaryCriteria")):
        reply = cohort(service, definition, "shapeless")
        assert reply.status == StepStatus.REFUSED and says in reply.reason, reply.reason


def test_the_sites_role_cannot_write_even_when_it_asks_for_a_writable_transaction(omop: dict[str, Any]) -> None:
    server, database = omop["server"], omop["databases"][SITE]
    password = database.password_file.read_text().strip()
    dsn = f"host=127.0.0.1 port={server.port} dbname={database.database} user={database.role} password={password}"
    before = untouched(omop)
    for statement in (
        "create table cdm.loot (a int)",
        "create table public.loot (a int)",
        "insert into cdm.person (person_id) values (-1)",
        "update cdm.person set year_of_birth = 1900",
        "delete from cdm.drug_exposure",
        "truncate cdm.concept",
        "create schema loot",
    ):
        with psycopg.connect(dsn) as connection:
            connection.execute("set default_transaction_read_only = off")  # its own choice: privileges still hold
            connection.execute("set transaction read write")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                connection.execute(statement)
    assert untouched(omop) == before


def test_after_these_attacks_the_site_still_makes_an_honest_cohort(omop: dict[str, Any], service: Any) -> None:
    reply = cohort(service, CELECOXIB, "honest")
    assert reply.status == StepStatus.OK and reply.table["cohort"] == "honest", reply.reason
    store, fingerprint = CohortStore(service.site.root), service.site.datasets["gibleed"].fingerprint
    assert len(store.rows_for("study", "honest", "gibleed", fingerprint)) > 0
    with pytest.raises(CohortRefused):  # no attack froze one
        store.rows_for("study", "injected", "gibleed", fingerprint)
