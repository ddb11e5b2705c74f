"""OMOP CDM databases on a real PostgreSQL (Debian's, started in the test's folder as an unprivileged user on a free
port): Eunomia's GiBleed split by person into three hospitals' databases, each read by FLIP through a read-only role
of its own, registered and checked with the real ``flip-site`` CLI, queried under the site's disclosure rules.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest

from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus
from flip_core.util import free_port
from flip_local import eunomia, postgres
from site_agent.data.catalog import CatalogError, init_site, load_site
from site_agent.data.omop import circe_persons
from site_agent.data.omop_db import Source, checks
from site_agent.queries.cohorts import CohortStore

from helpers import CELECOXIB, omop_site, omop_source

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
NOISE = 2  # the default count noise: each released count moves by at most this


def flip_site(*args: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BIN / "flip-site", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_the_three_sites_hold_every_person_once(omop: dict[str, Any]) -> None:
    databases = omop["databases"]
    assert sum(d.persons for d in databases.values()) == eunomia.PERSONS == 2694
    assert {s: d.persons for s, d in databases.items()} == {"Northfield": 913, "Riverside": 904, "Westbrook": 877}
    server = omop["server"]
    seen: set[int] = set()
    for database in databases.values():
        with psycopg.connect(server.admin(database.database)) as admin:
            ids = {r[0] for r in admin.execute("select person_id from cdm.person").fetchall()}
            outside = admin.execute(
                "select count(*) from cdm.condition_occurrence where person_id not in "
                "(select person_id from cdm.person)"
            ).fetchone()
        assert len(ids) == database.persons and not ids & seen and outside == (0,)
        assert {eunomia.site_of(i) for i in ids} == {database.site}
        seen |= ids


def test_a_site_registers_its_database_and_doctor_says_what_holds(omop: dict[str, Any]) -> None:
    home = omop["home"]
    database = omop["databases"]["Northfield"]
    site_dir = home / "Northfield-site"
    init_site(site_dir, "Northfield")
    added = flip_site("dataset", "add", site_dir, "gibleed", omop_source(omop, database.site), "--format", "omop")
    assert added.returncode == 0, added.stderr
    assert f"{database.persons} rows" in added.stdout
    entry = load_site(site_dir).datasets["gibleed"]
    assert entry.columns[:3] == ("gender", "year_of_birth", "age_at_start") and entry.rows == database.persons
    assert database.password_file.read_text().strip() not in (site_dir / "site.toml").read_text()
    doctor = flip_site("doctor", site_dir).stdout
    for said in ("the database answers", "an OMOP CDM of version 5", f"the role {database.role} can only read"):
        assert f"ok  gibleed  {said}" in doctor, doctor


def test_a_role_that_can_write_a_readable_secret_and_a_database_that_is_down_are_refused(
    omop: dict[str, Any], tmp_path: Path
) -> None:
    server, database = omop["server"], omop["databases"]["Westbrook"]
    site = init_site(tmp_path / "W", "Westbrook")
    admin_secret = tmp_path / "admin.pass"
    admin_secret.write_text((server.folder / "superuser.pass").read_text())
    admin_secret.chmod(0o600)
    superuser = omop_source(omop, "Westbrook", user=postgres.SUPERUSER, password_file=str(admin_secret))
    said = [s for ok, s in checks(Source.read(superuser)) if not ok]
    assert any("can write: it is a superuser" in s for s in said), said
    refused = flip_site("dataset", "add", site.root, "gibleed", superuser, "--format", "omop")
    assert refused.returncode != 0 and "cannot be registered" in refused.stderr and "superuser" in refused.stderr

    database.password_file.chmod(0o644)
    try:
        with pytest.raises(CatalogError, match="can be read by others"):
            Source.read(omop_source(omop, database.site)).password()
    finally:
        database.password_file.chmod(0o600)
    down = Source.read(omop_source(omop, "Westbrook", port=free_port()))
    with pytest.raises(CatalogError, match=r"the database did not answer \(127.0.0.1:\d+/omop_westbrook\)"):
        down.connect()


def test_a_query_counts_a_sites_persons_by_gender_under_its_rules(omop: dict[str, Any], tmp_path: Path) -> None:
    server = omop["server"]
    database = omop["databases"]["Westbrook"]
    service = omop_site(omop, "Westbrook", tmp_path)
    request = QueryRequest("q1", "study", "ada", "gibleed", QueryKind.COUNT, ("gender",), text="gibleed by gender")
    reply = decode_reply(service.answer(encode_query(request)))
    assert reply.status == StepStatus.OK, reply.reason
    with psycopg.connect(server.admin(database.database)) as admin:
        truth = dict(
            admin.execute(
                "select case gender_concept_id when 8507 then 'MALE' when 8532 then 'FEMALE' end, count(*) "
                "from cdm.person group by 1"
            ).fetchall()
        )
    released = dict(zip(reply.table["levels"][0], reply.table["cells"], strict=True))
    assert set(released) == set(truth) and all(abs(released[g] - n) <= NOISE for g, n in truth.items())


def reference_counts(definition: dict[str, Any], tmp_path: Path) -> dict[str, int]:
    """The definition run by the reference library (duckcdm's Circe, DuckDB dialect) on the whole Eunomia database,
    its persons counted by the site each belongs to."""
    import shutil

    import duckdb
    from duckcdm.circe import build_cohort_query
    from duckcdm.sqlrender import render, split_sql, translate

    copy = tmp_path / "eunomia.duckdb"
    shutil.copy(eunomia.duckdb_file(), copy)
    sql = build_cohort_query(
        json.dumps(definition), cdm_schema="main", vocabulary_schema="main", result_schema="main",
        target_table="flip_cohort", cohort_id=1, generate_stats=False,
    )  # fmt: skip
    connection = duckdb.connect(str(copy))
    connection.execute("create table flip_cohort (cohort_definition_id int, subject_id bigint, "
                       "cohort_start_date date, cohort_end_date date)")  # fmt: skip
    for statement in split_sql(translate(render(sql), "duckdb")):
        if statement.strip():
            connection.execute(statement)
    counts = {site: 0 for site in eunomia.SITES}
    for (person,) in connection.execute("select distinct subject_id from flip_cohort").fetchall():
        counts[eunomia.site_of(person)] += 1
    return counts


def test_a_circe_cohort_counts_at_each_site_as_the_reference_library_on_the_whole_database(
    omop: dict[str, Any], tmp_path: Path
) -> None:
    reference = reference_counts(CELECOXIB, tmp_path)
    assert reference == {"Northfield": 591, "Riverside": 605, "Westbrook": 604}  # the README's figures
    for site, database in omop["databases"].items():
        persons = circe_persons(Source.read(omop_source(omop, database.site)), CELECOXIB)
        assert len(persons) == reference[site], site  # exact, per site

    service = omop_site(omop, "Riverside", tmp_path)
    site = service.site
    asked = QueryRequest(
        "c1", "study", "ada", "gibleed", QueryKind.COHORT, cohort="celecoxib", circe=json.dumps(CELECOXIB)
    )
    reply = decode_reply(service.answer(encode_query(asked)))
    assert reply.status == StepStatus.OK, reply.reason
    assert abs(reply.table["total"] - reference["Riverside"]) <= NOISE and reply.table["cohort"] == "celecoxib"
    frozen = CohortStore(site.root).rows_for("study", "celecoxib", "gibleed", site.datasets["gibleed"].fingerprint)
    assert len(frozen) == reference["Riverside"]


COVARIATES: dict[str, Any] = {
    "features": [
        {"name": "celecoxib", "domain": "drug", "concepts": [1118084], "window": [0, 0]},
        {
            "name": "prior_conditions",
            "domain": "condition",
            "concepts": [441840],
            "window": [-365, -1],
            "value": "count",
        },
        {
            "name": "prior_bleed",
            "domain": "condition",
            "concepts": [192671],
            "descendants": False,
            "window": [-3650, -1],
        },
        {"name": "last_value", "domain": "measurement", "concepts": [3006322], "window": [-30, 0], "value": "last"},
    ],
    "outcome": {"name": "gi_bleed", "domain": "condition", "concepts": [192671], "window": [1, 3650]},
}


def expected_covariates(persons: dict[int, str]) -> Any:
    """The table of :data:`COVARIATES` worked out here, in pandas over Eunomia's own DuckDB file (not the site's
    SQL): for each person (by id) at its index date."""
    import duckdb
    import pandas as pd

    source = duckdb.connect(str(eunomia.duckdb_file()), read_only=True)
    ids = sorted(persons)
    person = (
        source.execute("select person_id, gender_concept_id, year_of_birth from person").df().set_index("PERSON_ID")
    )

    def descendants(concept: int) -> set[int]:
        found = source.execute(
            "select descendant_concept_id from concept_ancestor where ancestor_concept_id = ?", [concept]
        ).fetchall()
        return {int(r[0]) for r in found} | {concept}

    def days(frame: Any, index: Any) -> Any:
        return (pd.to_datetime(frame["d"]) - index).dt.days

    below, bleed = descendants(441840), descendants(192671)
    conditions = source.execute("select person_id, condition_concept_id c, condition_start_date d "
                                "from condition_occurrence").df()  # fmt: skip
    drugs = source.execute("select person_id, drug_concept_id c, drug_exposure_start_date d from drug_exposure").df()
    ends = source.execute("select person_id, max(observation_period_end_date) e from observation_period "
                          "group by person_id").df().set_index("PERSON_ID")["e"]  # fmt: skip
    rows = []
    for pid in ids:
        index = pd.Timestamp(persons[pid])
        mine, taken = conditions[conditions.PERSON_ID == pid], drugs[drugs.PERSON_ID == pid]
        before = mine[mine.c.isin(below) & days(mine, index).between(-365, -1)]
        earlier = mine[(mine.c == 192671) & days(mine, index).between(-3650, -1)]
        after = days(mine[mine.c.isin(bleed)], index)
        after = after[after.between(1, 3650)]
        observed = (pd.Timestamp(ends[pid]) - index).days
        rows.append({
            "gender": {8507: "MALE", 8532: "FEMALE"}[person.loc[pid, "GENDER_CONCEPT_ID"]],
            "age": index.year - person.loc[pid, "YEAR_OF_BIRTH"], "index_year": index.year,
            "celecoxib": int(((taken.c == 1118084) & (days(taken, index) == 0)).any()),
            "prior_conditions": len(before), "prior_bleed": int(len(earlier) > 0), "last_value": float("nan"),
            "gi_bleed": int(len(after) > 0), "gi_bleed_days": int(after.min()) if len(after) else min(3650, observed),
        })  # fmt: skip
    return pd.DataFrame(rows)


def test_a_covariate_table_is_what_the_cdm_says_of_each_person_at_their_index_date(omop: dict[str, Any]) -> None:
    """The site's SQL (``site_agent.data.omop_features``) against the same table worked out in pandas from Eunomia's
    own file, for Riverside's celecoxib new users at their cohort's index dates: demographics, a drug at index, a
    count of conditions below a concept in a window, a concept without its descendants, an outcome with its days to
    event or censoring; then a cohort's positions and its order survive the split into train and test."""
    import pandas as pd

    from flip_core.covariates import read_covariates
    from site_agent.data.omop_features import build

    source = Source.read(omop_source(omop, "Riverside"))
    index = circe_persons(source, CELECOXIB)
    rows = sorted(index)
    table = build(source, read_covariates(COVARIATES), rows, [index[r] for r in rows])
    with source.connect() as connection:
        order = [r[0] for r in connection.execute("select person_id from cdm.person order by person_id")]
    expected = expected_covariates({order[r]: index[r] for r in rows})
    pd.testing.assert_frame_equal(table, expected, check_dtype=False)
    assert table["gi_bleed"].sum() > 50 and table["prior_conditions"].max() > 1 and table["celecoxib"].all()


def test_a_measurements_last_value_in_its_window_is_the_latest_one(omop: dict[str, Any], tmp_path: Path) -> None:
    """Eunomia's measurements carry no values: in a copy of a site's database (made here by the superuser) one person
    gets three, two in the window and one after it; the table holds the latest in the window, and nothing for a
    person with none."""
    from flip_core.covariates import read_covariates
    from site_agent.data.omop_features import build

    server = omop["server"]
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute("drop database if exists omop_values with (force)")
        admin.execute("create database omop_values template omop_northfield")
    with psycopg.connect(server.admin("omop_values"), autocommit=True) as copy:
        first = copy.execute("select min(person_id) from cdm.person").fetchone()[0]
        start = copy.execute("select min(observation_period_start_date) from cdm.observation_period "
                             "where person_id = %s", [first]).fetchone()[0]  # fmt: skip
        for offset, value in ((3, 11.5), (10, 12.5), (40, 99.0)):
            copy.execute(
                "insert into cdm.measurement (measurement_id, person_id, measurement_concept_id, measurement_date, "
                "value_as_number) values (%s, %s, 3006322, %s::date + %s, %s)",
                [10**9 + offset, first, start, offset, value],
            )
    secret = tmp_path / "admin.pass"
    secret.write_text((server.folder / "superuser.pass").read_text())
    secret.chmod(0o600)
    source = Source.read(omop_source(omop, "Northfield", database="omop_values", user=postgres.SUPERUSER,
                                     password_file=str(secret)))  # fmt: skip
    spec = {
        "demographics": [],
        "features": [
            {"name": "value", "domain": "measurement", "concepts": [3006322], "window": [0, 30], "value": "last"}
        ],
    }
    table = build(source, read_covariates(spec), [0, 1], None)  # at the start of observation
    assert table["value"].iloc[0] == 12.5 and table["value"].isna().iloc[1]


def test_a_cohort_over_the_sites_limit_of_no_one_or_of_a_table_the_database_lacks_is_refused_in_a_sentence(
    omop: dict[str, Any], tmp_path: Path
) -> None:
    from site_agent.data.catalog import write_policy
    from site_agent.governance.gate import Governance
    from site_agent.queries.service import QueryService

    service = omop_site(omop, "Northfield", tmp_path)
    project = {"approved": True, "researchers": ["*"], "datasets": ["*"], "tasks": ["train", "query"]}
    write_policy(service.site, {"policy": {"cohort_limit_rows": 500}, "projects": {"study": project}})
    site = load_site(service.site.root)
    limited = QueryService(site, Governance(site), CohortStore(site.root))

    def freeze(name: str, definition: dict[str, Any]) -> Any:
        asked = QueryRequest(
            name, "study", "ada", "gibleed", QueryKind.COHORT, cohort=name, circe=json.dumps(definition)
        )
        return decode_reply(limited.answer(encode_query(asked)))

    too_big = freeze("celecoxib", CELECOXIB)  # 591 persons here
    assert too_big.status == StepStatus.REFUSED
    assert "would hold more rows than this site's limit for a cohort (500)" in too_big.reason
    nobody = json.loads(json.dumps(CELECOXIB).replace("1118084", "999999999"))  # a concept the vocabulary lacks
    empty = freeze("nobody", nobody)
    assert empty.status == StepStatus.REFUSED and "would hold fewer than 10 rows here" in empty.reason
    assert not (site.root / "cohorts" / "study" / "celecoxib.json").exists()

    server = omop["server"]
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        admin.execute("drop database if exists omop_lacking with (force)")
        admin.execute("create database omop_lacking template omop_northfield")
    with psycopg.connect(server.admin("omop_lacking"), autocommit=True) as copy:
        copy.execute("drop table cdm.device_exposure")
    secret = tmp_path / "admin.pass"
    secret.write_text((server.folder / "superuser.pass").read_text())
    secret.chmod(0o600)
    lacking = Source.read(omop_source(omop, "Northfield", database="omop_lacking", user=postgres.SUPERUSER,
                                      password_file=str(secret)))  # fmt: skip
    devices = json.loads(json.dumps(CELECOXIB))
    devices["PrimaryCriteria"]["CriteriaList"] = [{"DeviceExposure": {"CodesetId": 0}}]
    with pytest.raises(
        CatalogError, match=r"the database refused the cohort's SQL \(.*/omop_lacking\): .*device_exposure"
    ):
        circe_persons(lacking, devices)
