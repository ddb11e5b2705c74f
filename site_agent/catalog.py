"""A site's registered datasets: site.toml, table loading, fingerprints and seeded splits.

A site directory holds ``site.toml`` (the site's name and its datasets) and ``splits/``
(one JSON file per dataset recording the seeded train/test split). Nothing here talks to
the network; the agent and the task runner read it.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import tomli_w

from flip_core.errors import ConfigError

if TYPE_CHECKING:  # numpy and pandas load where tables are read: a task process reads its catalog
    import pandas as pd  # before its sandbox, while it is still one thread (numpy's BLAS starts threads)

log = logging.getLogger(__name__)

SITE_FILE = "site.toml"
FORMATS = ("csv", "uci-heart", "images")  # images: a manifest over image files (site_agent.image_datasets)
TABLE_FORMATS = ("csv", "uci-heart")
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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CatalogError(ConfigError):
    """A site directory or dataset registration problem, stated as a sentence."""

    public = ""  # what the researcher may read of it (fixed text; the sentence itself stays in the site's log)


class ImagesChanged(CatalogError):
    """An imaging dataset's file is not what was registered (or is gone)."""

    public = "the site's dataset (a file changed since it was registered: the site's admin must register it again)"


class ImagesUnreadable(CatalogError):
    """The task user cannot read an imaging dataset's files."""

    public = "the site's dataset (its image files cannot be read by the site's task user)"


PUBLIC_DATASET_ERRORS = (ImagesChanged.public, ImagesUnreadable.public)


@dataclass(frozen=True)
class DatasetEntry:
    """One registered dataset, as recorded in site.toml."""

    name: str
    path: str
    format: str
    fingerprint: str
    rows: int
    columns: tuple[str, ...]
    dtypes: tuple[str, ...]
    train_rows: int
    test_rows: int
    split_seed: int
    train_fraction: float
    stratify: str | None = None
    source: str = ""  # an imaging dataset's manifest (``path`` is then the site's index of it)
    inclusion: dict[str, Any] | None = None  # an imaging dataset's inclusion report (site_agent.images)

    @property
    def is_images(self) -> bool:
        return self.format == "images"

    def summary(self) -> dict[str, Any]:
        """What the site announces about this dataset (metadata only, never rows)."""
        summary = {
            "name": self.name,
            "format": self.format,
            "rows": self.rows,
            "train_rows": self.train_rows,
            "test_rows": self.test_rows,
            "columns": list(self.columns),
            "dtypes": list(self.dtypes),
            "fingerprint": self.fingerprint,
        }
        if self.inclusion is not None:
            summary["inclusion"] = self.inclusion
        return summary


@dataclass(frozen=True)
class SiteConfig:
    """A site directory read once: its name and its datasets."""

    root: Path
    name: str
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)

    def dataset(self, name: str) -> DatasetEntry:
        try:
            return self.datasets[name]
        except KeyError:
            have = ", ".join(sorted(self.datasets)) or "none"
            raise CatalogError(f"site {self.name!r} has no dataset {name!r} (it has: {have})") from None


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name):
        raise CatalogError(
            f"{kind} name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(at most 64 characters, starting with a letter or digit)"
        )
    return name


def init_site(root: Path, name: str) -> SiteConfig:
    """Create a new site directory with an empty catalog."""
    check_name("site", name)
    root = root.resolve()
    if (root / SITE_FILE).exists():
        raise CatalogError(f"{root / SITE_FILE} already exists: this directory is a site already")
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("splits", "logs", "scratch"):
        (root / sub).mkdir(exist_ok=True)
    config = SiteConfig(root=root, name=name)
    write_site(config)
    return config


def load_site(root: Path) -> SiteConfig:
    """Read a site directory's site.toml."""
    root = Path(root).resolve()
    path = root / SITE_FILE
    if not path.exists():
        raise CatalogError(f"{root} is not a site directory (no {SITE_FILE}); run `flip-site init` first")
    raw = tomllib.loads(path.read_text())
    datasets = {}
    for name, d in raw.get("datasets", {}).items():
        datasets[name] = DatasetEntry(
            name=name,
            path=d["path"],
            format=d["format"],
            fingerprint=d["fingerprint"],
            rows=int(d["rows"]),
            columns=tuple(d["columns"]),
            dtypes=tuple(d["dtypes"]),
            train_rows=int(d["train_rows"]),
            test_rows=int(d["test_rows"]),
            split_seed=int(d["split_seed"]),
            train_fraction=float(d["train_fraction"]),
            stratify=d.get("stratify") or None,
            source=d.get("source", ""),
            inclusion=d.get("inclusion"),
        )
    return SiteConfig(root=root, name=raw["site"]["name"], datasets=datasets)


def write_site(config: SiteConfig) -> None:
    """Write site.toml: the catalog from ``config``; every other table (the site's policy) kept as it was."""
    path = config.root / SITE_FILE
    kept = (
        {k: v for k, v in tomllib.loads(path.read_text()).items() if k not in ("site", "datasets")}
        if path.exists()
        else {}
    )
    doc: dict[str, Any] = {"site": {"name": config.name}, "datasets": {}}
    for name, d in sorted(config.datasets.items()):
        entry = {
            "path": d.path,
            "format": d.format,
            "fingerprint": d.fingerprint,
            "rows": d.rows,
            "columns": list(d.columns),
            "dtypes": list(d.dtypes),
            "train_rows": d.train_rows,
            "test_rows": d.test_rows,
            "split_seed": d.split_seed,
            "train_fraction": d.train_fraction,
        }
        if d.stratify:
            entry["stratify"] = d.stratify
        if d.source:
            entry["source"] = d.source
        if d.inclusion is not None:
            entry["inclusion"] = d.inclusion
        doc["datasets"][name] = entry
    doc.update(kept)
    tmp = config.root / (SITE_FILE + ".tmp")
    tmp.write_text(tomli_w.dumps(doc))
    tmp.replace(config.root / SITE_FILE)


def read_site_toml(root: Path) -> dict[str, Any]:
    """The whole parsed site.toml (catalog and policy)."""
    return tomllib.loads((Path(root) / SITE_FILE).read_text())


def write_policy(config: SiteConfig, tables: dict[str, Any]) -> None:
    """Replace site.toml's policy tables (``policy``, ``projects``) with ``tables``; the catalog stays."""
    if set(tables) - {"policy", "projects"}:
        raise CatalogError("only the [policy] and [projects] tables can be written as policy")
    path = config.root / SITE_FILE
    kept = {k: v for k, v in tomllib.loads(path.read_text()).items() if k not in ("policy", "projects")}
    tmp = config.root / (SITE_FILE + ".tmp")
    tmp.write_text(tomli_w.dumps({**kept, **tables}))
    tmp.replace(path)


def fingerprint_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def read_table(path: Path | IO[bytes], fmt: str) -> pd.DataFrame:
    """Load a table in one of the supported formats."""
    import pandas as pd

    if fmt == "csv":
        return pd.read_csv(path)
    if fmt == "uci-heart":
        return pd.read_csv(path, header=None, names=list(UCI_HEART_COLUMNS), na_values="?")
    if fmt == "images":
        from site_agent.image_datasets import as_table

        return as_table(json.loads(path.read() if not isinstance(path, Path) else path.read_bytes()))
    raise CatalogError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")


def seeded_split(
    labels: pd.Series | None, n_rows: int, train_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Row positions of a seeded train/test split, stratified on ``labels`` when given."""
    import numpy as np

    if not 0.0 < train_fraction < 1.0:
        raise CatalogError(f"train fraction must lie strictly between 0 and 1, not {train_fraction}")
    rng = np.random.default_rng(seed)
    groups: list[np.ndarray]
    if labels is None:
        groups = [np.arange(n_rows)]
    else:
        codes = labels.astype("string").fillna("<missing>").to_numpy()
        groups = [np.flatnonzero(codes == value) for value in sorted(set(codes))]
    train: list[int] = []
    test: list[int] = []
    for group in groups:
        shuffled = rng.permutation(group)
        cut = int(round(train_fraction * len(shuffled)))
        train.extend(int(i) for i in shuffled[:cut])
        test.extend(int(i) for i in shuffled[cut:])
    return sorted(train), sorted(test)


def _labels(table: pd.DataFrame, fmt: str, stratify: str | None) -> pd.Series | None:
    """What a split is stratified on (the UCI heart table's target: disease present)."""
    if stratify is None:
        return None
    labels = table[stratify]
    return labels > 0 if fmt == "uci-heart" and stratify == "num" else labels


def add_dataset(
    config: SiteConfig,
    name: str,
    path: Path,
    fmt: str,
    *,
    train_fraction: float = 0.8,
    split_seed: int = 0,
    stratify: str | None = None,
) -> SiteConfig:
    """Register a table: record schema, row count, fingerprint and a seeded split."""
    check_name("dataset", name)
    path = Path(path).resolve()
    if not path.is_file():
        raise CatalogError(f"no such file: {path}")
    if fmt not in TABLE_FORMATS:
        raise CatalogError(f"unknown table format {fmt!r}: use one of {', '.join(TABLE_FORMATS)}, or --format images")
    table = read_table(path, fmt)
    if fmt == "uci-heart" and stratify is None:
        stratify = "num"
    if stratify is not None and stratify not in table.columns:
        raise CatalogError(f"cannot stratify on {stratify!r}: the table has no such column")
    train, test = seeded_split(_labels(table, fmt, stratify), len(table), train_fraction, split_seed)
    split = {
        "dataset": name,
        "seed": split_seed,
        "train_fraction": train_fraction,
        "stratify": stratify,
        "train": train,
        "test": test,
    }
    (config.root / "splits").mkdir(exist_ok=True)
    (config.root / "splits" / f"{name}.json").write_text(json.dumps(split))
    entry = DatasetEntry(
        name=name,
        path=str(path),
        format=fmt,
        fingerprint=fingerprint_file(path),
        rows=len(table),
        columns=tuple(str(c) for c in table.columns),
        dtypes=tuple(str(t) for t in table.dtypes),
        train_rows=len(train),
        test_rows=len(test),
        split_seed=split_seed,
        train_fraction=train_fraction,
        stratify=stratify,
    )
    new = SiteConfig(root=config.root, name=config.name, datasets={**config.datasets, name: entry})
    write_site(new)
    return new


def verified_bytes(config: SiteConfig, name: str, read: Callable[[Path], IO[bytes]]) -> bytes:
    """The dataset file's bytes; refused when the file changed since registration."""
    entry = config.dataset(name)
    path = Path(entry.path)
    try:
        with read(path) as fh:
            data = fh.read()
    except FileNotFoundError:
        raise CatalogError(f"dataset {name!r} at site {config.name!r}: its file {path} is gone") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != entry.fingerprint:
        raise CatalogError(
            f"dataset {name!r} at site {config.name!r} changed since it was registered "
            "(fingerprint differs); register it again with `flip-site dataset add`"
        )
    return data


def load_table(config: SiteConfig, name: str) -> pd.DataFrame:
    """The whole registered table (rows in file order), for queries; refuses a file that changed."""
    data = verified_bytes(config, name, lambda p: open(p, "rb"))
    return read_table(io.BytesIO(data), config.dataset(name).format)


def load_split(
    config: SiteConfig,
    name: str,
    opener: Callable[[Path], IO[bytes]] | None = None,
    rows: list[int] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The dataset's recorded train and test parts; refuses a file that changed since registration.

    ``opener`` reads a file (default: by its path); a sandboxed task process reads the files the agent's
    user opened for it (``site_agent.sandbox.HandedFiles``). ``rows``: a cohort's row positions; its rows
    are split as the dataset was (its fraction, seed and stratification, applied to the cohort's rows in
    file order), so that training on a cohort is training on a copy of the table holding only those rows."""
    entry = config.dataset(name)
    read = opener or (lambda p: open(p, "rb"))
    data = verified_bytes(config, name, read)
    table = read_table(io.BytesIO(data), entry.format)
    if rows is not None:
        if rows and not 0 <= min(rows) <= max(rows) < len(table):
            raise CatalogError(f"the cohort names rows that dataset {name!r} at site {config.name!r} does not have")
        table = table.iloc[sorted(rows)].reset_index(drop=True)
        split = dict(
            zip(
                ("train", "test"),
                seeded_split(
                    _labels(table, entry.format, entry.stratify), len(table), entry.train_fraction, entry.split_seed
                ),
                strict=True,
            )
        )
    else:
        with read(config.root / "splits" / f"{name}.json") as fh:
            split = json.loads(fh.read())
    train = table.iloc[split["train"]].reset_index(drop=True)
    test = table.iloc[split["test"]].reset_index(drop=True)
    return train, test
