"""Attacks through a task's covariate specification (issue 28): a hostile researcher, or a hub that passes on whatever
it is sent, uses the table a task declares of an OMOP CDM database to make the site run SQL of theirs, hold it up,
run a table its admin never approved, train on dates of their choosing, or hand the task more than it declared.

The session's PostgreSQL with Eunomia's three hospitals (``conftest.omop``), one site registering its database with
the real CLI; the specifications go straight to the site's own code (``Governance.admit``, the agent's step,
``formats.handed``, ``omop_features.build``), past the hub's check of a task's body. Every attack asserts that the
site refused in a sentence, or did only what was declared, and within its limits.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import pytest

from flip_core.cell import source_hash, task_hash
from flip_core.covariates import MAX_CONCEPTS, MAX_DAYS, MAX_FEATURES, read_covariates
from flip_core.protocol import StepRequest, decode_result, encode_request
from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import Phase, StepStatus
from flip_core.util import free_port
from site_agent.agent import SiteAgent
from site_agent.data import formats
from site_agent.data.catalog import CatalogError, DatabaseUnanswered, init_site
from site_agent.data.omop_db import Source
from site_agent.data.omop_features import DOMAINS, _statement, build
from site_agent.governance.approvals import APPROVED, ApprovalStore
from site_agent.governance.audit import read_records
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortRefused, CohortStore

from helpers import CELECOXIB, omop_site

pytestmark = pytest.mark.integration
SITE = "Riverside"
CELL = "def build_model():\n    return None\n"
HONEST: dict[str, Any] = {
    "features": [{"name": "celecoxib", "domain": "drug", "concepts": [1118084], "window": [0, 0]}],
    "outcome": {"name": "gi_bleed", "domain": "condition", "concepts": [192671], "window": [1, 3650]},
}


@pytest.fixture(scope="module")
def service(omop: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The site's query service (its catalog, governance and cohorts), project "study" admitted."""
    return omop_site(omop, SITE, tmp_path_factory.mktemp("covariate-attacks"))


@pytest.fixture(scope="module")
def agent(service: Any) -> Iterator[SiteAgent]:
    """The site's agent (no hub: its steps are handed to it here), holding no spare task process."""
    made = SiteAgent(service.site, "127.0.0.1:1", "http://127.0.0.1:1", "token", warm_seconds=0)
    yield made
    made.tasks.close()


def freeze(service: Any, name: str) -> tuple[list[int], list[str]]:
    """The celecoxib new users frozen at the site under ``name``: their rows and index dates."""
    asked = QueryRequest(
        name, "study", "mallory", "gibleed", QueryKind.COHORT, cohort=name, circe=json.dumps(CELECOXIB)
    )
    reply = decode_reply(service.answer(encode_query(asked)))
    assert reply.status == StepStatus.OK, reply.reason
    store, fingerprint = CohortStore(service.site.root), service.site.datasets["gibleed"].fingerprint
    index = store.index_for("study", name, "gibleed", fingerprint)
    assert index is not None
    return store.rows_for("study", name, "gibleed", fingerprint), index


def step(covariates: Any, run: str, source: str = CELL, claimed: str = "sha256:claimed-by-the-hub") -> StepRequest:
    return StepRequest(
        run_id=run,
        source=source,
        source_hash=claimed,
        dataset="gibleed",
        project="study",
        researcher="mallory",
        seed=0,
        round=1,
        phase=Phase.FIT,
        config={},
        params={"w": np.zeros(2, np.float32)},
        covariates=covariates,
    )


def feature(**changes: Any) -> dict[str, Any]:
    """HONEST with its feature changed (a key set to None is taken out)."""
    changed = {**HONEST["features"][0], **changes}
    return {**HONEST, "features": [{k: v for k, v in changed.items() if v is not None}]}


def outcome(**changes: Any) -> dict[str, Any]:
    return {**HONEST, "outcome": {**HONEST["outcome"], **changes}}


HOSTILE: list[tuple[Any, str]] = [
    # concept ids are bound as whole numbers: text, fractions, out of range, booleans, NaN are not ones
    (feature(concepts=["1118084) or (1=1"]), "features.0.concepts.0: must be a whole number, not '1118084) or (1=1'"),
    (feature(concepts=["1118084"]), "features.0.concepts.0: must be a whole number"),
    (feature(concepts=[1118084.0]), "features.0.concepts.0: must be a whole number"),
    (feature(concepts=[1.5]), "features.0.concepts.0: must be a whole number"),
    (feature(concepts=[True]), "features.0.concepts.0: must be a whole number"),
    (feature(concepts=[float("nan")]), "features.0.concepts.0: must be a whole number"),
    (feature(concepts=[2**31]), "features.0.concepts.0: Input should be less than or equal to 2147483647"),
    (feature(concepts=[2**64 + 1]), "features.0.concepts.0: Input should be less than or equal to 2147483647"),
    (feature(concepts=[-1]), "features.0.concepts.0: Input should be greater than or equal to 0"),
    (feature(concepts="1118084"), "features.0.concepts: Input should be a valid array"),
    (outcome(concepts=["192671); drop table cdm.person; --"]), "outcome.concepts.0: must be a whole number"),
    # names are column labels: never quotes, semicolons, capitals or a line's end
    (feature(name="x'; drop table cdm.person; --"), 'features.0.name: "x\'; drop table cdm.person; --" is not a'),
    (feature(name='x"; select pg_sleep(100); --'), "features.0.name: 'x\"; select pg_sleep(100); --' is not a column"),
    (feature(name="celecoxib\n"), "features.0.name: 'celecoxib\\n' is not a column name"),
    (outcome(name="gi_bleed\n; drop"), "outcome.name: 'gi_bleed\\n; drop' is not a column name"),
    (feature(name="Person"), "features.0.name: 'Person' is not a column name"),
    # a domain is one of five words the site maps to its own tables, never a table's name
    (feature(domain="person; drop table cdm.person"), "features.0.domain: Input should be 'condition'"),
    (feature(domain="pg_authid"), "features.0.domain: Input should be 'condition'"),
    (feature(domain="condition_occurrence"), "features.0.domain: Input should be 'condition'"),
    (outcome(domain="person"), "outcome.domain: Input should be 'condition'"),
    (feature(value="count; drop table cdm.person"), "features.0.value: Input should be 'presence', 'count' or"),
    # windows are whole days, bounded
    (feature(window=["0", "1"]), "features.0.window.0: must be a whole number, not '0'"),
    (feature(window=["-365 or 1=1", 0]), "features.0.window.0: must be a whole number"),
    (feature(window=[0.5, 1]), "features.0.window.0: must be a whole number"),
    (feature(window=[0, MAX_DAYS + 1]), f"window 0..{MAX_DAYS + 1} must run from its first day to its last"),
    (feature(window=[0, 1, 2]), "features.0.window: Tuple should have at most 2 items"),
    (outcome(window=["1", 365]), "outcome.window.0: must be a whole number"),
    (feature(descendants="true"), "features.0.descendants: Input should be a valid boolean"),
    # demographics are three words, and nothing else is a key
    ({"demographics": ["person_id"]}, "demographics.0: Input should be 'gender', 'age' or 'index_year'"),
    ({"demographics": ["gender; drop table cdm.person"]}, "demographics.0: Input should be 'gender'"),
    ({**HONEST, "sql": "select * from cdm.person"}, "at sql: Extra inputs are not permitted"),
    (feature(table="cdm.person"), "features.0.table: Extra inputs are not permitted"),
    (outcome(where="1=1"), "outcome.where: Extra inputs are not permitted"),
    # and a specification is a JSON object
    ("select * from cdm.person", "the covariate specification is not JSON"),
    ([HONEST], "a covariate specification is a JSON object, not list"),
    (7, "a covariate specification is a JSON object, not int"),
]


@pytest.mark.parametrize(("n", "spec", "said"), [(n, *attack) for n, attack in enumerate(HOSTILE)])
def test_a_hostile_specification_sent_past_the_hub_is_refused_before_anything_runs(
    service: Any, agent: SiteAgent, n: int, spec: Any, said: str
) -> None:
    """Straight to the site's governance, and as the hub's step bytes to its agent: refused in a sentence naming the
    part, whatever hash the step claims; no task process, no request for the admin, the refusal in the audit log."""
    claimed = task_hash(CELL, HONEST)  # as if the hub had checked it and the admin approved it
    answer = Governance(service.site).admit(step(spec, f"hostile{n}", claimed=claimed))
    assert answer is not None and answer.status == StepStatus.REFUSED, answer
    assert answer.error_where.startswith(f"{SITE}: ") and said in answer.error_where, answer.error_where
    assert "covariate specification" in answer.error_where

    wire = f"hostile{n}-wire"
    replied = decode_result(agent._step(encode_request(step(spec, wire, claimed=claimed))))  # as the hub sends it
    assert replied.status == StepStatus.REFUSED and replied.error_where == answer.error_where
    assert agent.tasks.workers == {} and agent.tasks.spare is None  # no task process was started for it
    runs = (f"hostile{n}", wire)
    assert not [r for r in ApprovalStore(service.site.root).pending() if r["run_id"] in runs]  # nothing to approve
    audited = [r for r in read_records(service.site.root) if r.get("run") in runs and r["kind"] == "decision"]
    assert [(r["run"], r["verdict"], r["researcher"]) for r in audited] == [(run, "refuse", "mallory") for run in runs]
    assert all(said in r["reason"] for r in audited)


def test_a_hostile_specification_handed_to_the_database_is_refused_before_any_sql(
    omop: dict[str, Any], tmp_path: Path, service: Any
) -> None:
    """``formats.handed`` (what the agent calls when a run adopts its process) with the attacks' dicts, at a site
    whose database has gone away since it registered it: each is refused for what it is, a specification that is not
    one; an honest one reaches for the database, and is told that it did not answer. So no attack got that far."""
    site = omop_site(omop, SITE, tmp_path, statement_timeout_ms=2000).site
    source = site.datasets["gibleed"].path
    text = Path(source).read_text()
    Path(source).write_text(re.sub(r"(?m)^port = \d+$", f"port = {free_port()}", text))  # nothing listens there
    rows, index = freeze(service, "handed")
    for spec, said in HOSTILE:
        with pytest.raises(CatalogError) as refused:
            formats.handed(site, "gibleed", rows, spec, index)
        assert not isinstance(refused.value, DatabaseUnanswered) and said in str(refused.value), str(refused.value)
    with pytest.raises(DatabaseUnanswered, match="the database did not answer"):
        formats.handed(site, "gibleed", rows, HONEST, index)


SHAPE = ("condition", "drug", "procedure", "measurement", "observation")


def shaped(names: list[str], concepts: list[int], days: list[int]) -> dict[str, Any]:
    """A specification of every domain and kind of value, its names, concepts and windows given."""
    features = [
        {"name": names[i], "domain": domain, "concepts": [concepts[i], concepts[i] + 1],
         "window": [-days[i], days[i]], "value": "last" if domain == "measurement" else ("count", "presence")[i % 2]}
        for i, domain in enumerate(SHAPE)
    ]  # fmt: skip
    out = {"name": names[-1], "domain": "condition", "concepts": [concepts[-1]], "window": [1, days[-1]]}
    return {"features": features, "outcome": out}


def test_the_sql_the_site_builds_holds_no_text_of_the_specification() -> None:
    """The statement is the same text for two specifications of the same shape whose every name, concept id and window
    differ: none of those is in it; each concept set and window end is a bound parameter, and the only tables it
    reads are the CDM's the site names itself."""
    names = ["zq_first", "zq_second", "zq_third", "zq_fourth", "zq_fifth", "zq_outcome"]
    first = read_covariates(shaped(names, [987654301, 987654311, 987654321, 987654331, 987654341, 987654351],
                                   [12345, 12346, 12347, 12348, 12349, 23456]))  # fmt: skip
    other = read_covariates(shaped([n.replace("zq", "yx") for n in names], [40001, 40011, 40021, 40031, 40041, 40051],
                                   [7, 8, 9, 10, 11, 30]))  # fmt: skip
    expanded = [[*s.concepts, 3141592] for s in [*first.features, first.outcome]]  # as the vocabulary would add
    sql, params = _statement("cdm", first, expanded)
    assert sql == _statement("cdm", other, [[*s.concepts] for s in [*other.features, other.outcome]])[0]
    for name in names:
        assert name not in sql
    for number in [n for s in expanded for n in s] + [d for f in first.features for d in f.window] + [23456]:
        assert str(abs(number)) not in sql
    assert [params[f"c{i}"] for i in range(len(SHAPE))] + [params["oc"]] == expanded
    assert [(params[f"lo{i}"], params[f"hi{i}"]) for i in range(len(SHAPE))] == [f.window for f in first.features]
    assert (params["olo"], params["ohi"]) == (1, 23456)
    placeholders = set(re.findall(r"%\((\w+)\)s", sql))
    assert placeholders == set(params) | {"persons", "index"}  # what build() binds beside them
    tables = set(re.findall(r"\bcdm\.(\w+)", sql))
    assert tables <= {"person", "concept", "observation_period", *(t for t, _, _ in DOMAINS.values())}, tables


# -- denial of service -------------------------------------------------------------------------------------------
TIMEOUT_MS = 2000  # the source's statement timeout in these attacks
SLACK_S = 8  # generous: connecting, the table made in pandas, a busy machine; never a multiple of the timeout


def slow_source(omop: dict[str, Any], folder: Path) -> Source:
    database = omop["databases"][SITE]
    return Source.read(database.write_source(omop["server"], folder / "slow.toml", statement_timeout_ms=TIMEOUT_MS))


def largest(omop: dict[str, Any]) -> dict[str, Any]:
    """The most a specification may ask: every feature there may be, each of the most concepts (the vocabulary's
    broadest ancestors, with their descendants), over the widest window, and an outcome likewise."""
    with psycopg.connect(omop["server"].admin(omop["databases"][SITE].database)) as admin:
        broad = [
            int(r[0])
            for r in admin.execute(
                "select ancestor_concept_id from cdm.concept_ancestor group by 1 order by count(*) desc, 1 limit %s",
                [MAX_CONCEPTS],
            ).fetchall()
        ]
    broad += [2_000_000_000 + i for i in range(MAX_CONCEPTS - len(broad))]  # the rest ids no vocabulary holds
    features = [
        {"name": f"f{i}", "domain": SHAPE[i % 5], "concepts": broad, "window": [-MAX_DAYS, MAX_DAYS],
         "value": ("last" if SHAPE[i % 5] == "measurement" else ("count", "presence")[i % 2])}
        for i in range(MAX_FEATURES)
    ]  # fmt: skip
    return {"features": features, "outcome": {"name": "y", "domain": "condition", "concepts": broad,
                                              "window": [0, MAX_DAYS]}}  # fmt: skip


def timed_build(source: Source, spec: dict[str, Any], rows: list[int], index: list[str]) -> tuple[Any, float]:
    started = time.monotonic()
    try:
        made: Any = build(source, read_covariates(spec), rows, index)
    except DatabaseUnanswered as exc:
        made = exc
    return made, time.monotonic() - started


def assert_built_or_unanswered(made: Any, spec: dict[str, Any], rows: list[int], seconds: float) -> None:
    assert seconds < TIMEOUT_MS / 1000 + SLACK_S, f"the site was held {seconds:.1f} s (timeout {TIMEOUT_MS} ms)"
    if isinstance(made, DatabaseUnanswered):
        assert f"the database did not answer within {TIMEOUT_MS} ms" in str(made), str(made)
    else:
        assert list(made.columns) == read_covariates(spec).columns() and len(made) == len(rows)


def test_the_largest_specification_is_built_or_refused_within_the_statement_timeout(
    omop: dict[str, Any], service: Any, tmp_path: Path
) -> None:
    """200 features of 1000 concepts each over ±100 years, at the celecoxib cohort's persons: the site's table is
    made, or the site says the database did not answer, within about one statement timeout (the whole of the build,
    whatever its statements, and the database's own compilation of so large a plan, bounded by it)."""
    rows, index = freeze(service, "largest")
    spec = largest(omop)
    made, seconds = timed_build(slow_source(omop, tmp_path), spec, rows, index)
    assert_built_or_unanswered(made, spec, rows, seconds)
    honest, _ = timed_build(slow_source(omop, tmp_path), HONEST, rows, index)  # and the site still serves
    assert not isinstance(honest, Exception) and honest["celecoxib"].all()


def many_sets() -> dict[str, Any]:
    """Every feature there may be, each a concept set that asks for its descendants in the vocabulary."""
    return {"features": [feature(name=f"f{i}", concepts=[1118084 + i])["features"][0] for i in range(MAX_FEATURES)]}


@contextmanager
def large_vocabulary(omop: dict[str, Any], folder: Path) -> Iterator[Source]:
    """A copy of the site's database whose vocabulary holds four million more ancestor rows (a hospital's own holds
    tens of millions: reading it takes a while, within a statement timeout), as the site's read-only role reads it."""
    server, database = omop["server"], omop["databases"][SITE]
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute("drop database if exists omop_vocabulary with (force)")
        admin.execute(f"create database omop_vocabulary template {database.database}")
    try:
        with psycopg.connect(server.admin("omop_vocabulary"), autocommit=True) as copy:
            copy.execute(
                "insert into cdm.concept_ancestor (ancestor_concept_id, descendant_concept_id, "
                "min_levels_of_separation, max_levels_of_separation) "
                "select 3000000000 + g, g, 1, 1 from generate_series(1, 4000000) g"
            )
            copy.execute("analyze cdm.concept_ancestor")
        changes = {"database": "omop_vocabulary", "statement_timeout_ms": TIMEOUT_MS}
        yield Source.read(database.write_source(server, folder / "vocabulary.toml", **changes))
    finally:
        with psycopg.connect(server.admin(), autocommit=True) as admin:
            admin.execute("drop database if exists omop_vocabulary with (force)")


def test_many_concept_sets_over_a_large_vocabulary_hold_the_site_no_longer_than_one_statement_timeout(
    omop: dict[str, Any], service: Any, tmp_path: Path
) -> None:
    """200 concept sets, each expanded through a vocabulary that takes a fifth of a second to read: not 200 reads,
    each within the statement timeout (half a minute, for a 2 s timeout), but the whole build within about one."""
    rows, index = freeze(service, "vocabulary")
    spec = many_sets()
    with large_vocabulary(omop, tmp_path) as source:
        made, seconds = timed_build(source, spec, rows, index)
    assert_built_or_unanswered(made, spec, rows, seconds)


@contextmanager
def vocabulary_locked(omop: dict[str, Any]) -> Iterator[None]:
    """The site's ``cdm.concept_ancestor`` locked by a superuser's open transaction (a vocabulary being refreshed)."""
    with psycopg.connect(omop["server"].admin(omop["databases"][SITE].database)) as admin:
        admin.execute("lock table cdm.concept_ancestor in access exclusive mode")
        try:
            yield
        finally:
            admin.rollback()


def test_a_locked_vocabulary_is_said_to_be_unanswered_within_one_statement_timeout(
    omop: dict[str, Any], service: Any, tmp_path: Path
) -> None:
    """The same 200 concept sets while the vocabulary waits on a lock: the site says the database did not answer,
    after about one statement timeout; the lock gone, the same table is made."""
    rows, index = freeze(service, "locked")
    spec = many_sets()
    with vocabulary_locked(omop):
        made, seconds = timed_build(slow_source(omop, tmp_path), spec, rows, index)
    assert isinstance(made, DatabaseUnanswered), made
    assert_built_or_unanswered(made, spec, rows, seconds)
    made, _ = timed_build(slow_source(omop, tmp_path), spec, rows, index)
    assert not isinstance(made, Exception) and len(made.columns) == MAX_FEATURES + 3


# -- the approval binds the specification ------------------------------------------------------------------------
def test_an_approval_of_one_specification_admits_no_other_whatever_hash_the_step_claims(service: Any) -> None:
    """The admin approved the cell with specification A. The same cell with B, or with none, waits for the admin
    again though it claims A's hash; A written in another key order or with its defaults spelt out is A. A's JSON
    text with a second "features" (the one the site would read) is B, and the admin is shown B, in full."""
    source = CELL + "# the approval test\n"
    gate, store = Governance(service.site), ApprovalStore(service.site.root)
    approved = task_hash(source, HONEST)
    assert gate.admit(step(HONEST, "a1", source)).status == StepStatus.PENDING
    store.answer(approved[:24], APPROVED, project="study")
    assert gate.admit(step(HONEST, "a2", source)) is None

    other = feature(concepts=[1124300])  # diclofenac instead of celecoxib
    for run, spec in (("b1", other), ("b2", None), ("b3", {**HONEST, "outcome": None}), ("b4", {})):
        said = gate.admit(step(spec, run, source, claimed=approved))
        assert said is not None and said.status == StepStatus.PENDING, (run, said)
        assert said.error_where == f"waiting for approval at {SITE}"
    waiting = {r["hash"] for r in store.pending()}
    assert {task_hash(source, other), source_hash(source)} <= waiting and approved not in waiting

    spelt_out = {
        "outcome": {"window": [1, 3650], "descendants": True, "concepts": [192671], "domain": "condition",
                    "name": "gi_bleed"},
        "features": [{"value": "presence", "window": [0, 0], "descendants": True, "concepts": [1118084],
                      "domain": "drug", "name": "celecoxib"}],
        "demographics": ["gender", "age", "index_year"],
    }  # fmt: skip
    assert task_hash(source, spelt_out) == approved and gate.admit(step(spelt_out, "a3", source)) is None
    assert gate.admit(step(json.dumps(HONEST), "a4", source)) is None  # its JSON text is the same specification

    smuggled = feature(concepts=[1124300], window=[-7, 0])
    text = json.dumps(HONEST)[:-1] + ', "features": ' + json.dumps(smuggled["features"]) + "}"
    said = gate.admit(step(text, "b5", source, claimed=approved))
    assert said is not None and said.status == StepStatus.PENDING
    (shown,) = [r for r in store.pending() if r["run_id"] == "b5"]
    assert shown["hash"] == task_hash(source, smuggled)
    assert shown["covariates"] == read_covariates(smuggled).model_dump(mode="json")  # not the text as sent


# -- a cohort's index dates ----------------------------------------------------------------------------------------
def later(day: str, days: int = 1) -> str:
    return (date.fromisoformat(day) + timedelta(days=days)).isoformat()


def tampered(body: dict[str, Any], how: str) -> dict[str, Any]:
    rows, index = list(body["rows"]), list(body["index"])
    if how == "a date moved a day":
        index[0] = later(index[0])
    elif how == "two dates swapped":
        index[0], index[-1] = index[-1], index[0]
    elif how == "every date a year on":
        index = [later(d, 365) for d in index]
    elif how == "the dates taken out":
        index = []
    elif how == "the last date taken out":
        index = index[:-1]
    elif how == "the dates smuggled into a row":  # the hash's text unchanged: rows "…,N\0D1,…,Dn" and no dates
        rows[-1] = f"{rows[-1]}\0{','.join(index)}"
        index = []
    elif how == "two dates made one":  # the hash's text unchanged: "D1,D2" one entry, one date fewer
        index = [f"{index[0]},{index[1]}", *index[2:]]
    return {**body, "rows": rows, "index": index}


TAMPERINGS = (
    "a date moved a day",
    "two dates swapped",
    "every date a year on",
    "the dates taken out",
    "the last date taken out",
    "the dates smuggled into a row",
    "two dates made one",
)


@pytest.mark.parametrize("how", TAMPERINGS)
def test_a_cohorts_index_dates_edited_on_disk_are_refused(service: Any, how: str) -> None:
    """The frozen cohort's file, edited at the site: an edit of its index dates (or of how they are written) is
    refused by rows_for and index_for as an alteration; the file put back, the same rows and dates are used again."""
    rows, index = freeze(service, "dated")
    store, fingerprint = CohortStore(service.site.root), service.site.datasets["gibleed"].fingerprint
    path = service.site.root / "cohorts" / "study" / "dated.json"
    original = path.read_text()
    assert json.loads(original)["index"] == index and len(set(index)) > 1
    try:
        path.write_text(json.dumps(tampered(json.loads(original), how)))
        for read in (store.rows_for, store.index_for):
            with pytest.raises(CohortRefused, match="cohort 'dated' was altered since it was made"):
                read("study", "dated", "gibleed", fingerprint)
    finally:
        path.write_text(original)
    assert store.rows_for("study", "dated", "gibleed", fingerprint) == rows
    assert store.index_for("study", "dated", "gibleed", fingerprint) == index


# -- what a task is handed ----------------------------------------------------------------------------------------
def test_the_table_handed_to_a_task_holds_the_declared_columns_only(
    omop: dict[str, Any], service: Any, agent: SiteAgent
) -> None:
    """The agent's handing of a covariate table to a run's task process, read as the task reads it: the declared
    columns in their order, of the cohort's persons only, with no person's id in them, not even in a column the
    specification named person_id (the presence of its concepts, 0 or 1) or in the frames' row labels."""
    rows, index = freeze(service, "handed_only")
    spec = {
        "features": [
            {"name": "person_id", "domain": "drug", "concepts": [1118084], "window": [0, 0]},
            {"name": "visit_occurrence_id", "domain": "condition", "concepts": [441840], "window": [-365, -1],
             "value": "count"},
        ],
        "outcome": HONEST["outcome"],
    }  # fmt: skip
    handed = formats.handed(service.site, "gibleed", rows, spec, index)
    train, test = formats.task_data(service.site, "gibleed", handed.payload)
    declared = read_covariates(spec).columns()
    assert list(train.columns) == list(test.columns) == declared
    assert len(train) + len(test) == len(rows) and len(test) > 0
    with psycopg.connect(omop["server"].admin(omop["databases"][SITE].database)) as admin:
        order = [r[0] for r in admin.execute("select person_id from cdm.person order by person_id").fetchall()]
    persons = sorted(order[r] for r in rows)
    assert set(train["person_id"]) | set(test["person_id"]) <= {0, 1}
    for column in declared:  # no column holds the persons' ids
        assert not set(persons) <= {*train[column], *test[column]}, column
    for part in (train, test):
        assert list(part.index) == list(range(len(part)))  # its row labels are positions, not ids
    adopted = agent._adoption("gibleed", "handed_only", rows, spec, index)().handed  # what the agent hands its task
    for mine, theirs in zip(formats.task_data(service.site, "gibleed", adopted.payload), (train, test), strict=True):
        pd.testing.assert_frame_equal(mine, theirs)


def test_a_specification_on_a_dataset_that_is_no_omop_database_is_refused(tmp_path: Path, heart_dir: Path) -> None:
    """A table file (the UCI heart-disease table) is not an OMOP CDM: the site refuses to hand a task a covariate
    table of it, in a sentence naming the dataset, its format and why, for an honest specification and a hostile one,
    for the whole dataset and for rows of it; without a specification it hands the table as ever."""
    site = formats.add_dataset(init_site(tmp_path / "VA", "VA"), "heart", heart_dir / "processed.va.data", "uci-heart")
    for spec in (HONEST, {"sql": "select 1"}, "not even JSON"):
        for rows in (None, [0, 1, 2, 3, 4]):
            with pytest.raises(CatalogError) as refused:
                formats.handed(site, "heart", rows, spec)  # type: ignore[arg-type]
            assert str(refused.value) == (
                "dataset 'heart' at site 'VA' is of format uci-heart: a covariate specification is built from an "
                "OMOP CDM database"
            )
    train, test = formats.task_data(site, "heart", formats.handed(site, "heart").payload)
    assert "age" in train.columns and len(train) + len(test) == site.datasets["heart"].rows
