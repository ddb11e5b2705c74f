"""An OMOP CDM database as a site reaches it: its source file, a connection as its read-only role, the checks
registration and ``flip-site doctor`` make of it, and one unit of work held to its statement timeout as a whole
(:func:`session`), every failure said in a sentence that names the database (never the password, which lives in a
file only its owner reads). ``site_agent.data.omop`` (the dataset format and its Circe cohorts) and
``site_agent.data.omop_features`` (a covariate specification's table, the concepts ``top`` counts) build on it.
"""

from __future__ import annotations

import re
import stat
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from site_agent.data.catalog import CatalogError, DatabaseUnanswered

CONNECT_SECONDS = 5
REQUIRED_TABLES = ("person", "observation_period", "concept", "condition_occurrence", "drug_exposure", "cdm_source")
SOURCE_KEYS = ("host", "port", "database", "user", "password_file", "cdm_schema", "statement_timeout_ms")
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}\Z")


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
        if not _IDENTIFIER.fullmatch(source.cdm_schema):
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

    def unanswered(self, late: str = "") -> DatabaseUnanswered:
        """The sentence for a statement past the timeout (``late``: what did not finish)."""
        said = f": {late}" if late else ""
        return DatabaseUnanswered(
            f"the database did not answer within {self.statement_timeout_ms} ms{said} ({self.where})"
        )

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


class Session:
    """One unit of work in a source's database (:func:`session`): each statement is given what is left of the
    source's statement timeout, which holds for the whole of it."""

    def __init__(self, connection: Any, source: Source, deadline: float, late: str) -> None:
        self.connection, self.source, self.deadline, self.late = connection, source, deadline, late

    def execute(self, sql: str, params: Any = None) -> Any:
        left = int((self.deadline - time.monotonic()) * 1000)
        if left <= 0:
            raise self.source.unanswered(self.late)
        self.connection.execute("select set_config('statement_timeout', %s, true)", [str(left)])  # this transaction's
        return self.connection.execute(sql, params)

    def person_ids(self) -> list[int]:
        """The database's persons by id: the order of the persons' table and of every cohort's row positions."""
        return [int(r[0]) for r in self.execute(f"select person_id from {self.source.cdm_schema}.person order by 1")]


@contextmanager
def session(source: Source, what: str, late: str = "") -> Iterator[Session]:
    """A connection as the source's role for one unit of work (:class:`Session`), its failures said in sentences:
    past the statement timeout, :class:`DatabaseUnanswered` (``late``: what did not finish); refused by the
    database, a CatalogError saying what (``what``) and the database's first line."""
    import psycopg

    deadline = time.monotonic() + source.statement_timeout_ms / 1000
    try:
        with source.connect() as connection:
            yield Session(connection, source, deadline, late)
    except psycopg.errors.QueryCanceled:
        raise source.unanswered(late) from None
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"the database refused {what} ({source.where}): {first[:200]}") from None


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


__all__ = ["CONNECT_SECONDS", "REQUIRED_TABLES", "Session", "Source", "checks", "session"]
