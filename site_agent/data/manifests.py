"""A manifest of image files checked: the cases a site registers, the rows it excludes and why, a report.

Every file the manifest names is read with :func:`site_agent.data.images.read_image_info` (once each). Nothing is
excluded silently: each row left out has its reason, and the report counts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.images import ImageInfo, read_image_info
from site_agent.data.readers import ImageError, ReaderUnavailable, reason_of

if TYPE_CHECKING:
    import pandas as pd


@dataclass(frozen=True)
class ManifestCheck:
    """A manifest checked: its clinical columns, the included cases, the excluded rows and the report.

    Each case: ``row`` (its 0-based position among the manifest's data rows), ``image`` and ``mask`` (absolute
    paths; ``mask`` None without a mask column), ``label`` (None without a label column), ``patient_id`` (str),
    ``clinical`` ({column: value or None}), ``image_info`` and ``mask_info`` (:meth:`ImageInfo.to_json`)."""

    columns: tuple[str, ...]
    cases: list[dict[str, Any]]
    excluded: list[dict[str, Any]]
    report: dict[str, Any]


def check_manifest(
    manifest: Path,
    *,
    image_column: str = "image",
    label_column: str | None = None,
    mask_column: str | None = None,
    patient_column: str = "patient_id",
    skip_bad_files: bool = False,
) -> ManifestCheck:
    """Read every file a manifest names; the cases to register, the rows excluded (each with its reason), a report.

    A missing or unreadable image or mask refuses the whole manifest, with one ImageError naming every such file
    and its row, unless ``skip_bad_files``: then its row is excluded ("image file missing", "image file
    unreadable", "mask file missing", "mask file unreadable"). Other exclusions: "no image", "no patient id",
    "no label", "no mask", "image listed twice" (the first row is kept) and "missing slices" (a DICOM series with
    a gap). Relative paths are taken from the manifest's folder. In the error's sentences "row N" counts the
    data rows from 1, as a spreadsheet would below its header (N = position + 1); the ``row`` of a case or an
    excluded row is the position, from 0."""
    manifest = Path(manifest).resolve()
    if label_column is not None and mask_column is not None:
        raise ImageError(
            f"the manifest {manifest} cannot have both a label column ({label_column!r}) and a mask column "
            f"({mask_column!r}): choose one"
        )
    table = _read_manifest(manifest, [c for c in (image_column, mask_column, patient_column) if c is not None])
    have = [str(c) for c in table.columns]
    for name in (image_column, patient_column, label_column, mask_column):
        if name is not None and name not in have:
            raise ImageError(f"the manifest {manifest} has no column {name!r} (it has: {', '.join(have)})")
    special = {image_column, patient_column, label_column, mask_column}
    columns = tuple(c for c in have if c not in special)
    rows = _Rows(
        manifest,
        images=table[image_column].tolist(),
        patients=table[patient_column].tolist(),
        labels=_label_values(table[label_column]) if label_column is not None else None,
        masks=table[mask_column].tolist() if mask_column is not None else None,
        clinical={c: [_json_value(v) for v in table[c].tolist()] for c in columns},
    )
    for row in range(len(table)):
        rows.check(row)
    if rows.bad and not skip_bad_files:
        distinct = len({path for _, path, _ in rows.bad})
        are = "is" if distinct == 1 else "are"
        listed = "; ".join(f"row {row + 1}: {message}" for row, _, message in rows.bad)
        raise ImageError(
            f"the manifest {manifest} cannot be registered: {distinct} of its files {are} missing or unreadable: "
            f"{listed}"
        )
    report = _report(len(table), rows.cases, rows.excluded)
    return ManifestCheck(columns=columns, cases=rows.cases, excluded=rows.excluded, report=report)


@dataclass
class _Rows:
    """A manifest's rows as they are checked: the cases kept, the rows excluded and the bad files so far."""

    manifest: Path
    images: list[Any]
    patients: list[Any]
    labels: list[Any] | None
    masks: list[Any] | None
    clinical: dict[str, list[Any]]
    cases: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[int, Path, str]] = field(default_factory=list)
    seen: set[Path] = field(default_factory=set)
    read: dict[Path, ImageInfo | _BadFile] = field(default_factory=dict)  # each file once (masks may repeat)

    def info_of(self, path: Path) -> ImageInfo | _BadFile:
        if path not in self.read:
            if not path.exists():
                self.read[path] = _BadFile("missing", f"{path} is missing")
            else:
                try:
                    self.read[path] = read_image_info(path)
                except ReaderUnavailable:
                    raise  # no file of its kind can be read here: the site's installation, not the file
                except ImageError as exc:
                    self.read[path] = _BadFile("missing" if not path.exists() else "unreadable", exc.message)
        return self.read[path]

    def exclude(self, row: int, reason: str) -> None:
        self.excluded.append({"row": row, "reason": reason})

    def _blank(self, row: int) -> str | None:
        """Why a row cannot be a case before any file is read (an empty cell), or None."""
        if _text(self.images[row]) is None:
            return "no image"
        if _text(self.patients[row]) is None:
            return "no patient id"
        if self.labels is not None and self.labels[row] is None:
            return "no label"
        if self.masks is not None and _text(self.masks[row]) is None:
            return "no mask"
        return None

    def _file(self, row: int, path: Path, what: str) -> ImageInfo | None:
        """The file's info, or None with the row excluded (a bad file is also kept for the refusal)."""
        info = self.info_of(path)
        if isinstance(info, _BadFile):
            self.bad.append((row, path, info.message))
            self.exclude(row, f"{what} file {info.state}")
            return None
        if info.warning is not None:
            self.exclude(row, "missing slices")
            return None
        return info

    def check(self, row: int) -> None:
        if (reason := self._blank(row)) is not None:
            self.exclude(row, reason)
            return
        image = (self.manifest.parent / str(_text(self.images[row]))).resolve()
        if image in self.seen:
            self.exclude(row, "image listed twice")
            return
        self.seen.add(image)
        if (image_info := self._file(row, image, "image")) is None:
            return
        mask: Path | None = None
        mask_info: ImageInfo | None = None
        if self.masks is not None:
            mask = (self.manifest.parent / str(_text(self.masks[row]))).resolve()
            if (mask_info := self._file(row, mask, "mask")) is None:
                return
        self.cases.append(
            {
                "row": row,
                "image": str(image),
                "label": self.labels[row] if self.labels is not None else None,
                "mask": None if mask is None else str(mask),
                "patient_id": _text(self.patients[row]),
                "clinical": {c: values[row] for c, values in self.clinical.items()},
                "image_info": image_info.to_json(),
                "mask_info": None if mask_info is None else mask_info.to_json(),
            }
        )


@dataclass(frozen=True)
class _BadFile:
    """A file a manifest names that cannot be used: ``state`` is "missing" or "unreadable"."""

    state: str
    message: str


def _read_manifest(manifest: Path, path_columns: list[str]) -> pd.DataFrame:
    """The manifest's table; the path and patient id columns as text (a patient "007" stays "007")."""
    import pandas as pd

    if not manifest.is_file():
        raise ImageError(f"the manifest {manifest} is missing")
    try:
        return pd.read_csv(manifest, dtype={c: str for c in path_columns})
    except pd.errors.EmptyDataError:
        raise ImageError(f"the manifest {manifest} cannot be read (it is empty)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as exc:
        raise ImageError(f"the manifest {manifest} cannot be read as a CSV table ({reason_of(exc)})") from None


def _report(rows: int, cases: list[dict[str, Any]], excluded: list[dict[str, Any]]) -> dict[str, Any]:
    reasons: dict[str, int] = {}
    for entry in excluded:
        reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
    per_patient: dict[str, int] = {}
    kinds: dict[str, int] = {}
    for case in cases:
        per_patient[case["patient_id"]] = per_patient.get(case["patient_id"], 0) + 1
        kind = case["image_info"]["kind"]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "cases": rows,
        "included": len(cases),
        "excluded": reasons,
        "patients": len(per_patient),
        "patients_with_several_cases": sum(1 for n in per_patient.values() if n > 1),
        "kinds": kinds,
        "warnings": sum(1 for case in cases if case["image_info"].get("warning")),
    }


def _missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _text(value: Any) -> str | None:
    """A cell as text (stripped); None when it is empty."""
    if _missing(value):
        return None
    text = str(value).strip()
    return text or None


def _json_value(value: Any) -> Any:
    """A cell as a JSON-native value: bool, int, float or str; None for a missing one."""
    if _missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()  # a numpy scalar
    if isinstance(value, bool | int | float | str):
        return value
    return str(value)


def _label_values(column: pd.Series) -> list[Any]:
    """A label column's values: ints when the column holds whole numbers (1 and 1.0 alike; True/False as 1/0),
    floats for other numbers, text otherwise; None for an empty cell."""
    import pandas as pd

    values = [_json_value(v) for v in column.tolist()]
    values = [(v.strip() or None) if isinstance(v, str) else v for v in values]
    present = [v for v in values if v is not None]
    if all(isinstance(v, bool) for v in present) and present:
        return [None if v is None else int(v) for v in values]
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in present)
    if numeric and (pd.api.types.is_integer_dtype(column) or all(float(v).is_integer() for v in present)):
        return [None if v is None else int(v) for v in values]
    if numeric:
        return [None if v is None else float(v) for v in values]
    return [None if v is None else str(v) for v in values]
