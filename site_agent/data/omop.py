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
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatabaseUnanswered,
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

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "omop"
CONNECT_SECONDS = 5
REQUIRED_TABLES = ("person", "observation_period", "concept", "condition_occurrence", "drug_exposure", "cdm_source")
SOURCE_KEYS = ("host", "port", "database", "user", "password_file", "cdm_schema", "statement_timeout_ms")
OPTIONS: dict[str, Any] = {"train_fraction": 0.8, "split_seed": 0}
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

PERSONS_SQL = """
select
    coalesce(g.concept_name, case p.gender_concept_id when 8507 then 'MALE' when 8532 then 'FEMALE'
        else 'unknown' end) as gender,
    p.year_of_birth::int as year_of_birth,
    (extract(year from op.first_day)::int - p.year_of_birth)::int as age_at_start,
    extract(year from op.first_day)::int as start_year,
    (op.last_day - op.first_day)::int as observation_days,
    (select count(*) from {cdm}.condition_occurrence c where c.person_id = p.person_id)::int as conditions,
    (select count(*) from {cdm}.drug_exposure d where d.person_id = p.person_id)::int as drug_exposures
from {cdm}.person p
left join {cdm}.concept g on g.concept_id = p.gender_concept_id
left join (
    select person_id, min(observation_period_start_date) as first_day, max(observation_period_end_date) as last_day
    from {cdm}.observation_period group by person_id
) op on op.person_id = p.person_id
order by p.person_id
"""


@dataclass(frozen=True)
class Source:
    """A registered database, as its source file says (the password is read from its own file when connecting)."""

    host: str
    port: int
    database: str
    user: str
    password_file: Path
    cdm_schema: str = "cdm"
    statement_timeout_ms: int = 10_000

    @classmethod
    def read(cls, path: Path) -> Source:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise CatalogError(f"cannot read the database source {path}: {exc}") from None
        if unknown := sorted(set(raw) - set(SOURCE_KEYS)):
            raise CatalogError(f"the database source {path} has unknown setting(s) {', '.join(unknown)}")
        if missing := sorted({"host", "port", "database", "user", "password_file"} - set(raw)):
            raise CatalogError(f"the database source {path} lacks {', '.join(missing)}")
        source = cls(**{**raw, "password_file": Path(raw["password_file"])})
        if not _IDENTIFIER.match(source.cdm_schema):
            raise CatalogError(f"cdm_schema {source.cdm_schema!r} is not a schema name (lower case, digits, _)")
        return source

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}/{self.database}"

    def password(self) -> str:
        """The role's password, from a file only its owner reads (refused otherwise: a secret others can read
        is not one)."""
        try:
            mode = self.password_file.stat().st_mode
        except OSError:
            raise CatalogError(f"the database password file {self.password_file} does not exist") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise CatalogError(
                f"the database password file {self.password_file} can be read by others "
                f"(mode {stat.S_IMODE(mode):o}): chmod 600 it"
            )
        return self.password_file.read_text().strip()

    def connect(self) -> Any:
        """A connection as the source's role, its statement timeout set (and no JIT compilation, which that timeout
        does not stop); a sentence when the database does not answer (within :data:`CONNECT_SECONDS`)."""
        import psycopg

        try:
            return psycopg.connect(
                host=self.host,
                port=self.port,
                dbname=self.database,
                user=self.user,
                password=self.password(),
                connect_timeout=CONNECT_SECONDS,
                # no JIT: PostgreSQL compiles a large plan without heeding the statement timeout (a covariate
                # specification's 200 features held a 2 s timeout for half a minute)
                options=f"-c statement_timeout={int(self.statement_timeout_ms)} -c jit=off",
            )
        except psycopg.OperationalError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DatabaseUnanswered(f"the database did not answer ({self.where}): {first[:200]}") from None


def checks(source: Source) -> list[tuple[bool, str]]:
    """What ``flip-site doctor`` and registration say of a database: it answers, is an OMOP CDM 5.x with the tables
    FLIP reads, and its role can only read."""
    import psycopg

    out: list[tuple[bool, str]] = []
    cdm = source.cdm_schema
    try:
        with source.connect() as connection:
            out.append((True, f"the database answers ({source.where}, as {source.user})"))
            present = {
                r[0]
                for r in connection.execute(
                    "select table_name from information_schema.tables where table_schema = %s", [cdm]
                ).fetchall()
            }
            missing = [t for t in REQUIRED_TABLES if t not in present]
            out.append((not missing, f"the CDM tables FLIP reads are in schema {cdm}" + _lacking(missing)))
            if "cdm_source" in present:
                found = connection.execute(f"select cdm_version from {cdm}.cdm_source").fetchone()
                version = str(found[0] if found else "none")
                out.append(("5." in version, f"an OMOP CDM of version 5 (cdm_source says {version})"))
            out.append(_read_only(connection, source))
    except CatalogError as exc:
        out.append((False, str(exc)))
    except psycopg.Error as exc:
        out.append((False, f"the database refused FLIP's checks ({type(exc).__name__}): {str(exc).splitlines()[0]}"))
    return out


def _read_only(connection: Any, source: Source) -> tuple[bool, str]:
    """The role may not write: no superuser, no create in the database or schema, no write right on a table, and
    its transactions read-only by default."""
    row = connection.execute(
        """
        select r.rolsuper,
               has_database_privilege(current_user, current_database(), 'CREATE'),
               has_schema_privilege(current_user, %s, 'CREATE'),
               (select count(*) from information_schema.tables t where t.table_schema = %s
                  and has_table_privilege(current_user,
                      quote_ident(t.table_schema) || '.' || quote_ident(t.table_name),
                      'INSERT,UPDATE,DELETE,TRUNCATE')),
               current_setting('default_transaction_read_only')
        from pg_roles r where r.rolname = current_user
        """,
        [source.cdm_schema, source.cdm_schema],
    ).fetchone()
    superuser, create_db, create_schema, writable, read_only = row
    problems = [
        what
        for what, bad in (
            ("it is a superuser", superuser),
            ("it may create in the database", create_db),
            ("it may create in the schema", create_schema),
            (f"it may change {writable} table(s)", writable),
            ("its transactions are not read-only by default", read_only != "on"),
        )
        if bad
    ]
    said = f"the role {source.user} can only read" if not problems else f"the role {source.user} can write: "
    return not problems, said + "; ".join(problems)


def _lacking(missing: list[str]) -> str:
    return f" (missing: {', '.join(missing)})" if missing else ""


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
            train, test = seeded_split(None, len(table), entry.train_fraction, entry.split_seed)
        else:
            split = read_split(config.root, entry.name, open_file)
            train, test = split["train"], split["test"]
        parts = (table.iloc[train].reset_index(drop=True), table.iloc[test].reset_index(drop=True))
        return Handed(pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL))

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
        if rows is not None:
            train, test = seeded_split(None, len(table), entry.train_fraction, entry.split_seed)
        else:
            split = read_split(config.root, entry.name, open_file)
            train, test = split["train"], split["test"]
        parts = (table.iloc[train].reset_index(drop=True), table.iloc[test].reset_index(drop=True))
        return Handed(pickle.dumps(parts, protocol=pickle.HIGHEST_PROTOCOL))

    def task_data(self, config: SiteConfig, entry: DatasetEntry, payload: bytes) -> tuple[Part, Part]:
        train, test = pickle.loads(payload)  # made by the site agent, never by a task
        return train, test


def _persons(source: Source) -> pd.DataFrame:
    import pandas as pd
    import psycopg

    try:
        with source.connect() as connection:
            cursor = connection.execute(PERSONS_SQL.format(cdm=source.cdm_schema))
            names = [d.name for d in cursor.description or ()]
            return pd.DataFrame(cursor.fetchall(), columns=names)
    except psycopg.errors.QueryCanceled:
        raise DatabaseUnanswered(
            f"the database did not answer within {source.statement_timeout_ms} ms ({source.where})"
        ) from None
    except psycopg.Error as exc:
        raise CatalogError(f"the database refused FLIP's query ({source.where}): {str(exc).splitlines()[0]}") from None


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
    import psycopg
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
    try:
        with source.connect() as connection:
            connection.execute("set transaction read write")  # temporary tables only: the role may write nothing else
            connection.execute(
                f"create temp table {COHORT_TABLE} (cohort_definition_id int, subject_id bigint, "
                "cohort_start_date date, cohort_end_date date)"
            )
            for statement in statements:
                connection.execute(statement)
            chosen = dict(
                connection.execute(
                    f"select subject_id, min(cohort_start_date) from {COHORT_TABLE} group by subject_id"
                ).fetchall()
            )
            order = [r[0] for r in connection.execute(f"select person_id from {cdm}.person order by person_id")]
            connection.rollback()
    except psycopg.errors.QueryCanceled:
        raise DatabaseUnanswered(
            f"the database did not answer within {source.statement_timeout_ms} ms: the cohort did not finish "
            f"({source.where})"
        ) from None
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"the database refused the cohort's SQL ({source.where}): {first[:200]}") from None
    return {i: chosen[person].isoformat() for i, person in enumerate(order) if person in chosen}
