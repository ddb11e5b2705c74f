"""Imaging datasets, the ``images`` dataset format: a manifest over image files, checked, fingerprinted and split
at registration.

``flip-site dataset add DIR NAME MANIFEST.csv --format images`` reads every file the manifest names
(:func:`site_agent.data.manifests.check_manifest`) and writes the site's own record of what training will see,
``images/NAME.json`` (the *index*): each included case with its image's shape, spacing, orientation and
fingerprint, each excluded row with its reason, and the inclusion report. The dataset's fingerprint is
the index's. The seeded split (``splits/NAME.json``) keeps every case of a patient on one side, so
no patient is in both the train and the test part.

A run's task process is handed its own cases only (:func:`hand_cases`, by the agent, from the index, never the
manifest: a cohort's cases, or the recorded split) and only their files are bound into its sandbox; it checks every
image's fingerprint before its first use in the run (:func:`verify_cases`): a file changed since registration is
refused by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.catalog import (
    CatalogError,
    DatasetEntry,
    DatasetFormat,
    Handed,
    ImagesChanged,
    ImagesUnreadable,
    Part,
    SiteConfig,
    add_entry,
    check_name,
    format_options,
    open_file,
    read_split,
    seeded_split,
    verified_bytes,
    write_split,
)
from site_agent.data.images import verify_fingerprint
from site_agent.data.manifests import ManifestCheck, check_manifest
from site_agent.data.readers import ImageError

if TYPE_CHECKING:
    import pandas as pd

FORMAT = "images"
INTENSITY, VOXELS_DTYPE = "intensity", "voxels"  # the column of an image's voxels (site_agent.queries.image_statistics)
INDEX_FOLDER = "images"
IMAGE_KEY, LABEL_KEY, PATIENT_KEY = "image", "label", "patient_id"
# the columns a query sees beside the clinical ones: what registration measured of each image
SHAPE_COLUMNS = ("image_dim_0", "image_dim_1", "image_dim_2")
SPACING_COLUMNS = ("spacing_0", "spacing_1", "spacing_2")
INTENSITY_COLUMNS = ("intensity_mean", "intensity_std", "intensity_p1", "intensity_p99")


def index_path(root: Path, name: str) -> Path:
    return root / INDEX_FOLDER / f"{name}.json"


def build_index(
    name: str,
    manifest: Path,
    *,
    image_column: str = IMAGE_KEY,
    label_column: str | None = None,
    mask_column: str | None = None,
    patient_column: str = PATIENT_KEY,
    skip_bad_files: bool = False,
) -> dict[str, Any]:
    """Check the manifest and every file it names; the index to record (ImageError: refused, with each file)."""
    manifest = Path(manifest).resolve()
    if not manifest.is_file():
        raise ImageError(f"no such manifest: {manifest}")
    if label_column is None and mask_column is None and _has_column(manifest, LABEL_KEY):
        label_column = LABEL_KEY  # the manifest's own "label" column, unless the admin named another
    checked: ManifestCheck = check_manifest(
        manifest,
        image_column=image_column,
        label_column=label_column,
        mask_column=mask_column,
        patient_column=patient_column,
        skip_bad_files=skip_bad_files,
    )
    return {
        "dataset": name,
        "manifest": str(manifest),
        "manifest_fingerprint": "sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest(),
        "image_column": image_column,
        "label_column": label_column,
        "mask_column": mask_column,
        "patient_column": patient_column,
        "columns": list(checked.columns),
        "cases": checked.cases,
        "excluded": checked.excluded,
        "report": checked.report,
    }


def _has_column(manifest: Path, column: str) -> bool:
    import pandas as pd

    try:
        return column in pd.read_csv(manifest, nrows=0).columns
    except (ValueError, OSError):
        return False  # check_manifest says what is wrong with it


def index_bytes(index: dict[str, Any]) -> bytes:
    """The index as stored: canonical JSON (its hash is the dataset's fingerprint)."""
    return json.dumps(index, sort_keys=True, separators=(",", ":")).encode()


def classes(index: dict[str, Any]) -> list[Any] | None:
    """The labels a split is stratified on: one per included case, when the labels are classes (not floats, not
    masks); None otherwise."""
    if index["label_column"] is None or index["mask_column"] is not None:
        return None
    labels = [case["label"] for case in index["cases"]]
    return None if any(isinstance(v, float) for v in labels) else labels


def patient_split(index: dict[str, Any], train_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Positions of the included cases in the train and test parts: a seeded split of the *patients*, stratified
    on their first case's class when the labels are classes, every case of a patient on its patient's side."""
    import pandas as pd

    cases = index["cases"]
    patients: dict[str, list[int]] = {}
    for position, case in enumerate(cases):
        patients.setdefault(str(case[PATIENT_KEY]), []).append(position)
    order = list(patients)
    labels = classes(index)
    strata = None if labels is None else pd.Series([str(labels[patients[p][0]]) for p in order])
    train_patients, test_patients = seeded_split(strata, len(order), train_fraction, seed)
    train = sorted(i for p in train_patients for i in patients[order[p]])
    test = sorted(i for p in test_patients for i in patients[order[p]])
    return train, test


def task_case(case: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
    """One case as the cell's ``data.train`` holds it: the dictionary MONAI's dictionary transforms expect
    (``image``, ``label`` (the class, or the mask's path), ``patient_id``, then the clinical columns)."""
    out: dict[str, Any] = {IMAGE_KEY: case["image"]}
    if index["mask_column"] is not None:
        out[LABEL_KEY] = case["mask"]
    elif index["label_column"] is not None:
        out[LABEL_KEY] = case["label"]
    out[PATIENT_KEY] = case[PATIENT_KEY]
    for column in index["columns"]:
        out.setdefault(column, case["clinical"].get(column))
    return out


def case_files(index: dict[str, Any]) -> list[tuple[str, str]]:
    """Every file (or DICOM series folder) of the included cases, with its registered fingerprint."""
    files: dict[str, str] = {}
    for case in index["cases"]:
        files[case["image"]] = case["image_info"]["fingerprint"]
        if case.get("mask_info"):
            files[case["mask"]] = case["mask_info"]["fingerprint"]
    return sorted(files.items())


def verify_cases(index: dict[str, Any], positions: list[int]) -> None:
    """Every file of these cases still is what was registered (ImageError naming the first that is not)."""
    cases = index["cases"]
    for position in positions:
        case = cases[position]
        verify_fingerprint(Path(case["image"]), case["image_info"]["fingerprint"])
        if case.get("mask_info"):
            verify_fingerprint(Path(case["mask"]), case["mask_info"]["fingerprint"])


def as_table(index: dict[str, Any]) -> pd.DataFrame:
    """The included cases as a table for queries and cohorts (never paths): patient id, label (a class or
    value; a mask is not a column), the clinical columns, and each image's dimensions, spacing and intensities
    (mean, standard deviation, 1st and 99th percentiles, as registration measured them)."""
    import pandas as pd

    rows = []
    for case in index["cases"]:
        row: dict[str, Any] = {PATIENT_KEY: case[PATIENT_KEY]}
        if index["label_column"] is not None and index["mask_column"] is None:
            row[LABEL_KEY] = case["label"]
        row.update({c: case["clinical"].get(c) for c in index["columns"]})
        info = case["image_info"]
        shape, spacing = list(info["shape"]), list(info["spacing"] or [])
        for i, column in enumerate(SHAPE_COLUMNS):
            row[column] = shape[i] if i < len(shape) else None
        for i, column in enumerate(SPACING_COLUMNS):
            row[column] = spacing[i] if i < len(spacing) else None
        intensity = info.get("intensity") or {}
        for column in INTENSITY_COLUMNS:
            row[column] = intensity.get(column.removeprefix("intensity_"))
        rows.append(row)
    columns = [PATIENT_KEY, *([LABEL_KEY] if "label" in (rows[0] if rows else {}) else []), *index["columns"]]
    measured = [*SHAPE_COLUMNS, *SPACING_COLUMNS, *INTENSITY_COLUMNS]
    table = pd.DataFrame(rows, columns=[*columns, *measured])
    table[measured] = table[measured].astype("float64")  # numbers, missing where an image has no such axis
    return table


def add_image_dataset(
    config: SiteConfig,
    name: str,
    manifest: Path,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    mask_column: str | None = None,
    patient_column: str = "patient_id",
    skip_bad_files: bool = False,
    train_fraction: float = 0.8,
    split_seed: int = 0,
) -> SiteConfig:
    """Register an imaging dataset: read and fingerprint every file its manifest names (refused, naming each
    file, when one is missing or unreadable), record the index of what training sees, an inclusion report and
    a seeded split by patient (:mod:`site_agent.data.image_datasets`)."""

    check_name("dataset", name)
    entry = _register(
        config,
        name,
        manifest,
        image_column=image_column,
        label_column=label_column,
        mask_column=mask_column,
        patient_column=patient_column,
        skip_bad_files=skip_bad_files,
        train_fraction=train_fraction,
        split_seed=split_seed,
    )
    return add_entry(config, entry)


def _register(
    config: SiteConfig,
    name: str,
    manifest: Path,
    *,
    train_fraction: float,
    split_seed: int,
    **columns: Any,
) -> DatasetEntry:
    """The index and the split written under the site's folder; the entry site.toml keeps. ``columns``: the
    manifest's columns and ``skip_bad_files``, as :func:`build_index` takes them."""
    try:
        index = build_index(name, manifest, **columns)
    except ImageError as exc:
        raise CatalogError(str(exc)) from None
    if not index["cases"]:
        raise CatalogError(f"the manifest {index['manifest']} has no usable case ({_reasons(index['report'])})")
    train, test = patient_split(index, train_fraction, split_seed)
    stored = index_bytes(index)
    path = index_path(config.root, name)
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(stored)
    split = {"dataset": name, "seed": split_seed, "train_fraction": train_fraction, "train": train, "test": test}
    write_split(config.root, name, split)
    label = "label" if index["label_column"] is not None or index["mask_column"] is not None else None
    # the cell's keys that are files (never a query's column), then what queries see: the cases' table
    table = as_table(index)
    files = ("image", *(("label",) if index["mask_column"] is not None else ()))
    columns_seen = (*files, *(str(c) for c in table.columns), INTENSITY)  # intensity: the voxels, for `hist intensity`
    dtypes = (*("path" for _ in files), *(str(t) for t in table.dtypes), VOXELS_DTYPE)
    return DatasetEntry(
        name=name,
        path=str(path),
        format=FORMAT,
        fingerprint="sha256:" + hashlib.sha256(stored).hexdigest(),
        rows=len(index["cases"]),
        columns=columns_seen,
        dtypes=dtypes,
        train_rows=len(train),
        test_rows=len(test),
        split_seed=split_seed,
        train_fraction=train_fraction,
        stratify=label if classes(index) is not None else None,
        source=index["manifest"],
        inclusion=index["report"],
    )


def _reasons(report: dict[str, Any]) -> str:
    excluded = report.get("excluded") or {}
    return ", ".join(f"{count} {reason}" for reason, count in sorted(excluded.items())) or "no rows"


def hand_cases(config: SiteConfig, name: str, rows: list[int] | None = None) -> Handed:
    """What a run's task process is handed of an imaging dataset (made by the agent): its train and test cases only,
    with the index's columns a case needs (JSON), and the files of those cases, to bind into its sandbox. ``rows``:
    a cohort's case positions, split again as the dataset was (by patient); None: the recorded split."""
    entry = config.dataset(name)
    index = json.loads(verified_bytes(config, name, open_file))
    if rows is not None:
        if rows and not 0 <= min(rows) <= max(rows) < len(index["cases"]):
            raise CatalogError(f"the cohort names cases that dataset {name!r} at site {config.name!r} does not have")
        index = {**index, "cases": [index["cases"][i] for i in sorted(rows)]}
        train, test = patient_split(index, entry.train_fraction, entry.split_seed)
    else:
        split = read_split(config.root, name, open_file)
        train, test = split["train"], split["test"]
    cases = index["cases"]
    handed = {key: index[key] for key in ("label_column", "mask_column", "columns")}
    handed.update(train=[cases[i] for i in train], test=[cases[i] for i in test])
    files = case_files({"cases": handed["train"] + handed["test"]})
    return Handed(json.dumps(handed).encode(), tuple(Path(path) for path, _ in files))


def task_cases(config: SiteConfig, name: str, payload: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """In the task process: the handed cases as the cell's ``data.train`` and ``data.test`` hold them (dictionaries
    for MONAI's dictionary transforms), after checking that every one of their files is what was registered."""
    handed = json.loads(payload)
    cases = handed["train"] + handed["test"]
    try:
        verify_cases({"cases": cases}, list(range(len(cases))))
    except ImageError as exc:
        raise ImagesChanged(
            f"dataset {name!r} at site {config.name!r}: {exc}; register it again with `flip-site dataset add`"
        ) from None
    except PermissionError as exc:
        raise ImagesUnreadable(
            f"dataset {name!r} at site {config.name!r}: the task cannot read {exc.filename} "
            "(the task user needs read access to the image files)"
        ) from None
    return [task_case(c, handed) for c in handed["train"]], [task_case(c, handed) for c in handed["test"]]


def load_cases(
    config: SiteConfig, name: str, rows: list[int] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """An imaging dataset's train and test cases as a run's cell gets them, read in this process (tests, benchmarks):
    handed (:func:`hand_cases`), then checked and made into the cell's dictionaries (:func:`task_cases`)."""
    return task_cases(config, name, hand_cases(config, name, rows).payload)


IMAGE_OPTIONS: dict[str, Any] = {
    "image_column": IMAGE_KEY,
    "label_column": None,
    "mask_column": None,
    "patient_column": PATIENT_KEY,
    "skip_bad_files": False,
    "train_fraction": 0.8,
    "split_seed": 0,
}


class ImagesFormat(DatasetFormat):
    """The ``images`` format: a manifest (a CSV, one row per case) naming image files, read at registration into
    the site's index of them; queries see the cases' table, a task gets the cases and reads their files by path."""

    name = FORMAT

    def register(self, config: SiteConfig, name: str, source: str | Path, **options: Any) -> DatasetEntry:
        return _register(config, name, Path(source), **format_options(self.name, options, IMAGE_OPTIONS))

    def table(self, config: SiteConfig, entry: DatasetEntry) -> pd.DataFrame:
        return as_table(json.loads(verified_bytes(config, entry.name, open_file)))

    def handed(self, config: SiteConfig, entry: DatasetEntry, rows: list[int] | None = None) -> Handed:
        return hand_cases(config, entry.name, rows)

    def task_data(self, config: SiteConfig, entry: DatasetEntry, payload: bytes) -> tuple[Part, Part]:
        return task_cases(config, entry.name, payload)


IMAGES = ImagesFormat()
