"""The dataset formats a site knows, by name, and what goes through them.

Each format (:class:`~site_agent.data.catalog.DatasetFormat`) registers under its name: ``csv`` and ``uci-heart``
(``site_agent.data.tables``), ``images`` (``site_agent.data.image_datasets``). Registering a dataset, the table a
query reads, the split a task gets and the files a task process is handed are all asked of the dataset's format;
an unknown name is refused in a sentence listing the known ones. ``flip-site dataset add --format`` offers
:data:`FORMATS`' names.

To add a format: a module in this package with a ``DatasetFormat`` of its own, registered here beside the others.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatasetEntry,
    DatasetFormat,
    Opener,
    Part,
    SiteConfig,
    add_entry,
    check_name,
    open_file,
)
from site_agent.data.image_datasets import IMAGES
from site_agent.data.registry import Registry
from site_agent.data.tables import CSV, UCI_HEART, TableFormat

if TYPE_CHECKING:
    import pandas as pd

FORMATS: Registry[DatasetFormat] = Registry("dataset format", CatalogError)
FORMATS.register(CSV.name, CSV)
FORMATS.register(UCI_HEART.name, UCI_HEART)
FORMATS.register(IMAGES.name, IMAGES)


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


def load_split(
    config: SiteConfig, name: str, opener: Opener | None = None, rows: list[int] | None = None
) -> tuple[Part, Part]:
    """The dataset's recorded train and test parts, as a task's cell gets them (a table's rows, an imaging
    dataset's cases); refused when the data changed since registration.

    ``opener`` reads a file (default: by its path); a sandboxed task process reads the files the agent's
    user opened for it (``site_agent.sandbox.HandedFiles``). ``rows``: a cohort's row positions, split as
    the dataset was."""
    entry = config.dataset(name)
    return format_of(entry).task_data(config, entry, opener or open_file, rows)


def handed_files(site: SiteConfig) -> list[Path]:
    """What a task process is handed of the site, opened by the agent's user before its sandbox: each dataset's
    files its format names (a table and its recorded split; an imaging dataset's index and split)."""
    return [path for entry in site.datasets.values() for path in _files(site, entry, bound=False)]


def bound_files(site: SiteConfig) -> list[Path]:
    """The files a task reads by their own path (an imaging dataset's registered images and DICOM series
    folders), bound read-only into its sandbox and allowed by Landlock: the only ones of the site's there."""
    return sorted({path for entry in site.datasets.values() for path in _files(site, entry, bound=True)})


def _files(site: SiteConfig, entry: DatasetEntry, *, bound: bool) -> list[Path]:
    """A dataset's handed or bound files; none for a format nobody registered (a step on it is refused, naming
    the format, when it reads the dataset)."""
    if entry.format not in FORMATS:
        if not bound:  # said once
            print(f"WARNING: dataset {entry.name!r} has the unknown format {entry.format!r}", file=sys.stderr)
        return []
    fmt = format_of(entry)
    return fmt.bound_files(site, entry) if bound else fmt.handed_files(site, entry)
