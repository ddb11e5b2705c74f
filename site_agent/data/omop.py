"""OMOP CDM databases on PostgreSQL, the ``omop`` dataset format: a hospital's research database as FLIP's source.

A site admin writes a source file (TOML: ``host``, ``port``, ``database``, ``user``, ``password_file``,
``cdm_schema``, ``statement_timeout_ms``) and registers it: ``flip-site dataset add DIR NAME SOURCE.toml --format
omop``. The password lives in a file of its own that only its owner may read (mode 0600, else refused), never in
``site.toml``, the source file or a log. Registration (and ``flip-site doctor``) checks that the database answers,
that it is an OMOP CDM of version 5.x with the tables FLIP reads, and that the role can only read: no superuser, no
right to create in the database or the schema, no insert, update, delete or truncate on any table, and a read-only
default transaction.

What queries and training see is one row per person, made by SQL of the site's own (never a researcher's):
gender (the concept's name; OMOP's standard 8507 MALE and 8532 FEMALE where a vocabulary lacks them), year of
birth, age and year at the start of observation, days observed, and counts of condition occurrences and drug
exposures. Every statement runs under the source's statement timeout; a database that is down or slow is said in a
sentence naming it, within seconds.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatasetEntry,
    DatasetFormat,
    Handed,
    Part,
    SiteConfig,
    format_options,
    open_file,
    read_split,
    seeded_split,
    write_split,
)
from site_agent.data.omop_db import Source, checks, session

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "omop"
OPTIONS: dict[str, Any] = {"train_fraction": 0.8, "split_seed": 0}

PERSONS_SQL = """
select
    coalesce(g.concept_name, case p.gender_concept_id when 8507 then 'MALE' when 8532 then 'FEMALE'
        else 'unknown' end) as gender,
    p.year_of_birth::int as year_of_birth,
    (extract(year from op.first_day)::int - p.year_of_birth)::int as age_at_start,
    extract(year from op.first_day)::int as start_year,
    (op.last_day - op.first_day)::int as observation_days,
    coalesce(c.n, 0)::int as conditions,
    coalesce(d.n, 0)::int as drug_exposures
from {cdm}.person p
left join {cdm}.concept g on g.concept_id = p.gender_concept_id
left join (
    select person_id, min(observation_period_start_date) as first_day, max(observation_period_end_date) as last_day
    from {cdm}.observation_period group by person_id
) op on op.person_id = p.person_id
left join (select person_id, count(*) as n from {cdm}.condition_occurrence group by person_id) c
    on c.person_id = p.person_id
left join (select person_id, count(*) as n from {cdm}.drug_exposure group by person_id) d on d.person_id = p.person_id
order by p.person_id
"""


class OmopFormat(DatasetFormat):
    name = FORMAT

    def register(self, config: SiteConfig, name: str, source: str | Path, **options: Any) -> DatasetEntry:
        """Check the database (:func:`checks`: every one must hold), read its persons' table and record its size,
        fingerprint and a seeded split by person."""
        settings = format_options(self.name, options, OPTIONS)
        path = Path(source).resolve()
        database = Source.read(path)
        if failed := [said for ok, said in checks(database) if not ok]:
            raise CatalogError(f"the database {database.where} cannot be registered: {'; '.join(failed)}")
        table = _persons(database)
        train, test = seeded_split(None, len(table), settings["train_fraction"], settings["split_seed"])
        write_split(config.root, name, {"dataset": name, "seed": settings["split_seed"], "train": train, "test": test})
        return DatasetEntry.of_table(name, path, self.name, _fingerprint(table), table, (train, test), settings)

    def table(self, config: SiteConfig, entry: DatasetEntry) -> pd.DataFrame:
        """The persons' table as the database holds it now; refused when it is not what was registered."""
        table = _persons(Source.read(Path(entry.path)))
        if _fingerprint(table) != entry.fingerprint:
            raise CatalogError(
                f"dataset {entry.name!r} at site {config.name!r} changed in its database since it was registered: "
                "the site's admin registers it again"
            )
        return table

    def handed(self, config: SiteConfig, entry: DatasetEntry, rows: list[int] | None = None) -> Handed:
        table = self.table(config, entry)
        if rows is not None:
            table = table.iloc[sorted(rows)].reset_index(drop=True)
        return _split_by_person(config, entry, table, rows is not None)

    def handed_covariates(
        self,
        config: SiteConfig,
        entry: DatasetEntry,
        covariates: dict[str, Any],
        rows: list[int] | None = None,
        index: list[str] | None = None,
    ) -> Handed:
        """The per-person table a task's covariate specification declares (``site_agent.data.omop_features``), of
        the cohort's persons at their ``index`` dates (or every person), split by person as :meth:`handed` splits
        the persons' table. The database must still be the one registered."""
        from flip_core.covariates import read_covariates
        from site_agent.data.omop_features import build

        try:
            spec = read_covariates(covariates)
        except ValueError as exc:
            raise CatalogError(str(exc)) from None
        self.table(config, entry)  # refused when the database changed since registration
        table = build(Source.read(Path(entry.path)), spec, rows, index)
        return _split_by_person(config, entry, table, rows is not None)

    def task_data(self, config: SiteConfig, entry: DatasetEntry, payload: bytes) -> tuple[Part, Part]:
        train, test = pickle.loads(payload)  # made by the site agent, never by a task
        return train, test


def _split_by_person(config: SiteConfig, entry: DatasetEntry, table: pd.DataFrame, cohort: bool) -> Handed:
    """A table of one row per person (in person order) handed as its train and test parts: a cohort's split as the
    dataset's is (its fraction and seed), the whole database's by its registered split."""
    if cohort:
        train, test = seeded_split(None, len(table), entry.train_fraction, entry.split_seed)
    else:
        split = read_split(config.root, entry.name, open_file)
        train, test = split["train"], split["test"]
    parts = (table.iloc[train].reset_index(drop=True), table.iloc[test].reset_index(drop=True))
    return Handed(pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL))


def _persons(source: Source) -> pd.DataFrame:
    import pandas as pd

    with session(source, "FLIP's query") as db:
        cursor = db.execute(PERSONS_SQL.format(cdm=source.cdm_schema))
        names = [d.name for d in cursor.description or ()]
        return pd.DataFrame(cursor.fetchall(), columns=names)


def _fingerprint(table: pd.DataFrame) -> str:
    return "sha256:" + hashlib.sha256(table.to_csv(index=False).encode()).hexdigest()


OMOP = OmopFormat()


MAX_CIRCE_CHARS = 200_000
COHORT_TABLE = "flip_cohort"


def circe_problem(definition: Any) -> str:
    """Why ``definition`` (a parsed Circe cohort expression) is not one a site renders ("" when it is): concept ids
    must be whole numbers, and no text in it may hold a quote, a semicolon or a backslash (Circe writes its texts
    into SQL)."""
    if not isinstance(definition, dict):
        return "a Circe cohort definition is a JSON object (ATLAS's export of a cohort)"
    if "PrimaryCriteria" not in definition:
        return "the definition has no PrimaryCriteria (the events a cohort starts from)"

    def walk(value: Any, where: str) -> str:
        if isinstance(value, dict):
            for key, item in value.items():
                if key.upper() == "CONCEPT_ID" and (isinstance(item, bool) or not isinstance(item, int)):
                    return f"{where}.{key} must be a whole number, not {str(item)[:40]!r}"
                if problem := walk(item, f"{where}.{key}"):
                    return problem
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if problem := walk(item, f"{where}[{i}]"):
                    return problem
        elif isinstance(value, str) and any(c in value for c in "';\\"):
            return f"{where} holds a quote, semicolon or backslash ({value[:40]!r}): not in a cohort definition"
        return ""

    return walk(definition, "definition")


def circe_persons(source: Source, definition: dict[str, Any]) -> dict[int, str]:
    """The row positions (in :data:`PERSONS_SQL`'s order) of the persons a Circe definition selects in this
    database, each with its index date (its first cohort start, ISO): its SQL rendered here (duckcdm's port of
    OHDSI's Circe and SqlRender, PostgreSQL dialect), run as the source's role in one transaction of its own, whose
    temporary tables go when it is rolled back."""
    from duckcdm.circe import CirceError, build_cohort_query  # type: ignore[import-untyped]
    from duckcdm.sqlrender import render, split_sql, translate  # type: ignore[import-untyped]

    if problem := circe_problem(definition):
        raise CatalogError(problem)
    cdm = source.cdm_schema
    try:
        rendered = build_cohort_query(
            json.dumps(definition), cdm_schema=cdm, vocabulary_schema=cdm, result_schema=cdm,
            target_table=COHORT_TABLE, cohort_id=1, generate_stats=False,
        )  # fmt: skip
        statements = [s for s in split_sql(translate(render(rendered), "postgresql")) if s.strip()]
    except (CirceError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CatalogError(
            f"the cohort definition cannot be rendered ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    with session(source, "the cohort's SQL", late="the cohort did not finish") as db:
        db.connection.execute("set transaction read write")  # first: temporary tables only, it may write nothing else
        db.execute(
            f"create temp table {COHORT_TABLE} (cohort_definition_id int, subject_id bigint, "
            "cohort_start_date date, cohort_end_date date)"
        )
        for statement in statements:
            db.execute(statement)
        found = db.execute(f"select subject_id, min(cohort_start_date) from {COHORT_TABLE} group by subject_id")
        chosen = dict(found.fetchall())
        order = db.person_ids()
        db.connection.rollback()
    return {i: chosen[person].isoformat() for i, person in enumerate(order) if person in chosen}
