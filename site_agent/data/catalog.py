"""A site's registered datasets as the site records them: site.toml, fingerprints, seeded splits, and what a
dataset format does.

A site directory holds ``site.toml`` (the site's name and its datasets) and ``splits/``
(one JSON file per dataset recording the seeded train/test split). Each dataset is of a format
(:class:`DatasetFormat`), registered by name in ``site_agent.data.formats``, which says how it is
registered, read for queries and handed to a run's task process (:class:`Handed`: made by the agent, the run's
rows only). Nothing here talks to the network; the agent reads it, and a task process reads none of it: what it
gets of the site is what it was handed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeAlias

import tomli_w

from flip_core.errors import ConfigError

if TYPE_CHECKING:  # numpy and pandas load where tables are read: a task process reads its catalog
    import pandas as pd  # before its sandbox, while it is still one thread (numpy's BLAS starts threads)

log = logging.getLogger(__name__)

SITE_FILE = "site.toml"
SPLITS = "splits"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
Opener = Callable[[Path], IO[bytes]]  # reads one of the site's files (the agent's user; a test's own reader)
Part: TypeAlias = "pd.DataFrame | list[dict[str, Any]]"  # what a task gets of a dataset: a table, or its cases


class CatalogError(ConfigError):
    """A site directory or dataset registration problem, stated as a sentence."""

    public = ""  # what the researcher may read of it (fixed text; the sentence itself stays in the site's log)


class ImagesChanged(CatalogError):
    """An imaging dataset's file is not what was registered (or is gone)."""

    public = "the site's dataset (a file changed since it was registered: the site's admin must register it again)"


class ImagesUnreadable(CatalogError):
    """The task user cannot read an imaging dataset's files."""

    public = "the site's dataset (its image files cannot be read by the site's task user)"


class DatabaseUnanswered(CatalogError):
    """A dataset's database (an OMOP CDM's) did not answer, or not within its statement timeout."""

    public = "the site's dataset (its database did not answer: the site's log says why)"


PUBLIC_DATASET_ERRORS = (ImagesChanged.public, ImagesUnreadable.public, DatabaseUnanswered.public)


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
    inclusion: dict[str, Any] | None = None  # an imaging dataset's inclusion report (site_agent.data.manifests)

    @classmethod
    def of_table(
        cls,
        name: str,
        path: Path,
        fmt: str,
        fingerprint: str,
        table: pd.DataFrame,
        split: tuple[list[int], list[int]],
        settings: dict[str, Any],
    ) -> DatasetEntry:
        """The entry of a dataset that is one table (its schema and size measured from ``table``), split as
        ``split`` by ``settings`` (``split_seed``, ``train_fraction``, ``stratify``)."""
        return cls(
            name=name,
            path=str(path),
            format=fmt,
            fingerprint=fingerprint,
            rows=len(table),
            columns=tuple(str(c) for c in table.columns),
            dtypes=tuple(str(t) for t in table.dtypes),
            train_rows=len(split[0]),
            test_rows=len(split[1]),
            split_seed=settings["split_seed"],
            train_fraction=settings["train_fraction"],
            stratify=settings.get("stratify"),
        )

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
    if not _NAME.fullmatch(name):
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


def verified_bytes(config: SiteConfig, name: str, read: Opener) -> bytes:
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


def add_entry(config: SiteConfig, entry: DatasetEntry) -> SiteConfig:
    """The catalog with ``entry`` added (or replacing the dataset of its name), written to site.toml."""
    new = SiteConfig(root=config.root, name=config.name, datasets={**config.datasets, entry.name: entry})
    write_site(new)
    return new


def split_path(root: Path, name: str) -> Path:
    """Where the dataset's recorded train/test split is kept."""
    return root / SPLITS / f"{name}.json"


def write_split(root: Path, name: str, split: dict[str, Any]) -> None:
    """Record the dataset's split (its seed and fraction, the train and test positions) at registration."""
    (root / SPLITS).mkdir(exist_ok=True)
    split_path(root, name).write_text(json.dumps(split))


def read_split(root: Path, name: str, read: Opener) -> dict[str, Any]:
    """The dataset's recorded split, read with ``read``."""
    with read(split_path(root, name)) as fh:
        split: dict[str, Any] = json.loads(fh.read())
    return split


def open_file(path: Path) -> IO[bytes]:
    """Read a file by its path (the agent's own user, outside any sandbox)."""
    return open(path, "rb")


def format_options(fmt: str, given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """A format's registration settings: ``defaults`` updated with ``given``; refused when one is not the format's."""
    if unknown := sorted(set(given) - set(defaults)):
        raise CatalogError(
            f"dataset format {fmt!r} takes no option {', '.join(map(repr, unknown))} "
            f"(its options: {', '.join(defaults)})"
        )
    return {**defaults, **given}


@dataclass(frozen=True)
class Handed:
    """What a run's task process is handed of its dataset, made by the agent (outside the sandbox) when the run adopts
    the process: ``payload``, the run's rows (or cases) only, already split as the cell gets them, in the format's own
    bytes; ``files``, what the cell reads by its own path (an imaging run's cases' image files), bound into the
    process's sandbox, and nothing else of the site."""

    payload: bytes
    files: tuple[Path, ...] = ()


class DatasetFormat(ABC):
    """What a dataset format does, registered under its :attr:`name` in ``site_agent.data.formats``.

    A dataset need not be a file: registration is handed a ``source`` (a path, or whatever names the data for
    this format) and records what it measured as a :class:`DatasetEntry`; reading it later is the format's own
    business, refused when the data is not what was registered."""

    name: str

    @abstractmethod
    def register(self, config: SiteConfig, name: str, source: str | Path, **options: Any) -> DatasetEntry:
        """Check ``source``, record what a task will see of it (its split, its index) under the site's folder, and
        return the entry site.toml keeps (the caller writes it). ``options``: the format's own settings (a
        CatalogError names one it does not take)."""

    @abstractmethod
    def table(self, config: SiteConfig, entry: DatasetEntry) -> pd.DataFrame:
        """The table a query sees, its rows in the dataset's order (the positions cohorts and filters name)."""

    @abstractmethod
    def handed(self, config: SiteConfig, entry: DatasetEntry, rows: list[int] | None = None) -> Handed:
        """What a run's task process is handed (the agent makes it, reading and checking the site's files): the
        recorded split, or with ``rows`` (a cohort's positions) those rows split as the dataset was; nothing of any
        other row, and no descriptor or path of a file beyond the run's own (its table, index or split, another
        case's image). CatalogError when the data is not what was registered."""

    @abstractmethod
    def task_data(self, config: SiteConfig, entry: DatasetEntry, payload: bytes) -> tuple[Part, Part]:
        """In the task process: what the cell gets as ``data.train`` and ``data.test``, from the ``payload`` the
        agent handed it (:meth:`handed`)."""
