"""The dataset formats a site knows, by name, and what goes through them.

Each format (:class:`~site_agent.data.catalog.DatasetFormat`) registers under its name: ``csv`` and ``uci-heart``
(``site_agent.data.tables``), ``images`` (``site_agent.data.image_datasets``). Registering a dataset, the table a
query reads, what a run's task process is handed (:func:`handed`, made by the agent: the run's rows only) and the
split its cell gets of that (:func:`task_data`) are all asked of the dataset's format; an unknown name is refused in
a sentence listing the known ones. ``flip-site dataset add --format`` offers
:data:`FORMATS`' names.

To add a format: a module in this package with a ``DatasetFormat`` of its own, registered here beside the others.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatasetEntry,
    DatasetFormat,
    Handed,
    Part,
    SiteConfig,
    add_entry,
    check_name,
)
from site_agent.data.image_datasets import IMAGES
from site_agent.data.omop import OMOP
from site_agent.data.registry import Registry
from site_agent.data.tables import CSV, UCI_HEART, TableFormat

if TYPE_CHECKING:
    import pandas as pd

FORMATS: Registry[DatasetFormat] = Registry("dataset format", CatalogError)
FORMATS.register(CSV.name, CSV)
FORMATS.register(UCI_HEART.name, UCI_HEART)
FORMATS.register(IMAGES.name, IMAGES)
FORMATS.register(OMOP.name, OMOP)


def format_of(entry: DatasetEntry) -> DatasetFormat:
    """The registered format of a dataset (CatalogError for a name nobody registered)."""
    return FORMATS.get(entry.format)


def add_dataset(
    config: SiteConfig,
    name: str,
    source: str | Path,
    fmt: str,
    *,
    train_fraction: float = 0.8,
    split_seed: int = 0,
    **options: Any,
) -> SiteConfig:
    """Register a dataset of format ``fmt`` under ``name``: what its format records of it (its fingerprint, the
    columns queries see, a seeded split by ``train_fraction`` and ``split_seed``), written to site.toml.
    ``options``: the format's own settings (a table's ``stratify``, a manifest's columns)."""
    check_name("dataset", name)
    registering = FORMATS.get(fmt)
    entry = registering.register(config, name, source, train_fraction=train_fraction, split_seed=split_seed, **options)
    return add_entry(config, entry)


def read_table(source: Path | IO[bytes], fmt: str) -> pd.DataFrame:
    """A table file (or stream) read as format ``fmt`` would read it (a table format: ``csv``, ``uci-heart``)."""
    table_format = FORMATS.get(fmt)
    if not isinstance(table_format, TableFormat):
        tables = ", ".join(f.name for f in FORMATS if isinstance(f, TableFormat))
        raise CatalogError(f"dataset format {fmt!r} is not a table file: use one of {tables}")
    return table_format.read(source)


def load_table(config: SiteConfig, name: str) -> pd.DataFrame:
    """The dataset as queries see it: its whole table, rows in their registered order; refused when the data
    changed since registration."""
    entry = config.dataset(name)
    return format_of(entry).table(config, entry)


def handed(
    config: SiteConfig,
    name: str,
    rows: list[int] | None = None,
    covariates: dict[str, Any] | None = None,
    index: list[str] | None = None,
) -> Handed:
    """What a run's task process is handed of dataset ``name``, made by the agent (its user, outside the sandbox)
    when the run adopts the process: the run's rows only, ``rows`` a cohort's positions (None: the whole dataset),
    split as the dataset was, and the files its cell reads by path (an imaging run's cases'); with ``covariates``
    (an OMOP database's), the table they declare, of the cohort's persons at their ``index`` dates; refused
    (CatalogError) when the data changed since registration, or its format is unknown here."""
    entry = config.dataset(name)
    if covariates is None:
        return format_of(entry).handed(config, entry, rows)
    if entry.format != OMOP.name:
        raise CatalogError(
            f"dataset {name!r} at site {config.name!r} is of format {entry.format}: a covariate specification is "
            "built from an OMOP CDM database"
        )
    return OMOP.handed_covariates(config, entry, covariates, rows, index)


def task_data(config: SiteConfig, name: str, payload: bytes) -> tuple[Part, Part]:
    """In the task process: the cell's train and test parts of dataset ``name`` from the payload it was handed."""
    entry = config.dataset(name)
    return format_of(entry).task_data(config, entry, payload)


def load_split(config: SiteConfig, name: str, rows: list[int] | None = None) -> tuple[Part, Part]:
    """The dataset's train and test parts exactly as a run's cell gets them (a table's rows, an imaging dataset's
    cases), handed and read in this one process (tests, benchmarks, a session without a task process); refused when
    the data changed since registration. ``rows``: a cohort's row positions, split as the dataset was."""
    return task_data(config, name, handed(config, name, rows).payload)
