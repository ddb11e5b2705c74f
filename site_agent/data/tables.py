"""Tables held in one file: the ``csv`` and ``uci-heart`` dataset formats.

Registration reads the whole table, records its schema, row count and fingerprint, and a seeded
train/test split of its rows (stratified when asked; the UCI heart table on its target, disease
present). A query, and the agent for a run's task process, read the file again, refused when its bytes are not
those registered; a task process is handed the run's two parts only, never the file.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatasetEntry,
    DatasetFormat,
    Handed,
    Part,
    SiteConfig,
    fingerprint_file,
    format_options,
    open_file,
    read_split,
    seeded_split,
    verified_bytes,
    write_split,
)

if TYPE_CHECKING:
    import pandas as pd

UCI_HEART_COLUMNS = (
    "age",
    "sex",
    "cp",
    "trestbps",
    "chol",
    "fbs",
    "restecg",
    "thalach",
    "exang",
    "oldpeak",
    "slope",
    "ca",
    "thal",
    "num",
)
TABLE_OPTIONS: dict[str, Any] = {"train_fraction": 0.8, "split_seed": 0, "stratify": None}


def _read_csv(source: Path | IO[bytes]) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(source)


def _read_uci_heart(source: Path | IO[bytes]) -> pd.DataFrame:
    import pandas as pd

    return pd.read_csv(source, header=None, names=list(UCI_HEART_COLUMNS), na_values="?")


class TableFormat(DatasetFormat):
    """A table in one file, parsed by ``reader``; ``target``: the column a split is stratified on by default,
    and how its values become classes."""

    def __init__(
        self,
        name: str,
        reader: Callable[[Path | IO[bytes]], pd.DataFrame],
        target: tuple[str, Callable[[pd.Series], pd.Series]] | None = None,
    ) -> None:
        self.name = name
        self.read = reader
        self.target = target

    def _labels(self, table: pd.DataFrame, stratify: str | None) -> pd.Series | None:
        """What a split is stratified on (the UCI heart table's target: disease present)."""
        if stratify is None:
            return None
        labels = table[stratify]
        if self.target is not None and stratify == self.target[0]:
            return self.target[1](labels)
        return labels

    def register(self, config: SiteConfig, name: str, source: str | Path, **options: Any) -> DatasetEntry:
        """Record schema, row count, fingerprint and a seeded split (``train_fraction``, ``split_seed``,
        ``stratify``: a column; the format's target by default)."""
        settings = format_options(self.name, options, TABLE_OPTIONS)
        train_fraction, split_seed, stratify = settings["train_fraction"], settings["split_seed"], settings["stratify"]
        path = Path(source).resolve()
        if not path.is_file():
            raise CatalogError(f"no such file: {path}")
        table = self.read(path)
        if stratify is None and self.target is not None:
            stratify = self.target[0]
        if stratify is not None and stratify not in table.columns:
            raise CatalogError(f"cannot stratify on {stratify!r}: the table has no such column")
        train, test = seeded_split(self._labels(table, stratify), len(table), train_fraction, split_seed)
        write_split(
            config.root,
            name,
            {
                "dataset": name,
                "seed": split_seed,
                "train_fraction": train_fraction,
                "stratify": stratify,
                "train": train,
                "test": test,
            },
        )
        chosen = {"split_seed": split_seed, "train_fraction": train_fraction, "stratify": stratify}
        return DatasetEntry.of_table(name, path, self.name, fingerprint_file(path), table, (train, test), chosen)

    def table(self, config: SiteConfig, entry: DatasetEntry) -> pd.DataFrame:
        """The whole registered table (rows in file order); refuses a file that changed."""
        return self.read(io.BytesIO(verified_bytes(config, entry.name, open_file)))

    def handed(self, config: SiteConfig, entry: DatasetEntry, rows: list[int] | None = None) -> Handed:
        """The run's two parts, read and checked here by the agent, pickled: the task process gets these rows and
        never the file. ``rows``: a cohort's row positions, split as the dataset was (its fraction, seed and
        stratification, applied to the cohort's rows in file order), so that training on a cohort is training on a
        copy of the table holding only those rows."""
        return Handed(pickle.dumps(self._parts(config, entry, rows), protocol=pickle.HIGHEST_PROTOCOL))

    def task_data(self, config: SiteConfig, entry: DatasetEntry, payload: bytes) -> tuple[Part, Part]:
        """The parts as the agent handed them (its own pickle: only the agent's bytes are ever unpickled here)."""
        train, test = pickle.loads(payload)  # made by the site agent, never by a task
        return train, test

    def _parts(self, config: SiteConfig, entry: DatasetEntry, rows: list[int] | None) -> tuple[Part, Part]:
        name = entry.name
        table = self.read(io.BytesIO(verified_bytes(config, name, open_file)))
        if rows is not None:
            if rows and not 0 <= min(rows) <= max(rows) < len(table):
                raise CatalogError(f"the cohort names rows that dataset {name!r} at site {config.name!r} does not have")
            table = table.iloc[sorted(rows)].reset_index(drop=True)
            labels = self._labels(table, entry.stratify)
            split = dict(
                zip(
                    ("train", "test"),
                    seeded_split(labels, len(table), entry.train_fraction, entry.split_seed),
                    strict=True,
                )
            )
        else:
            split = read_split(config.root, name, open_file)
        train = table.iloc[split["train"]].reset_index(drop=True)
        test = table.iloc[split["test"]].reset_index(drop=True)
        return train, test


CSV = TableFormat("csv", _read_csv)
UCI_HEART = TableFormat("uci-heart", _read_uci_heart, target=("num", lambda num: num > 0))
