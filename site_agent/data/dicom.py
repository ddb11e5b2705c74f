"""DICOM at a site, read with pydicom (no ITK): one file, or a folder holding one series (two image readers).

A series' slices are sorted along the slice normal (ImagePositionPatient on the cross product of the
ImageOrientationPatient vectors; InstanceNumber where positions are missing), and a gap between slices well
beyond their usual spacing is a warning: slices are missing (a converter or a transfer dropped them).
Orientation codes are RAS+ axis codes of DICOM's x, y and z (the column index, the row index, the normal).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.readers import Decoded, ImageError, ImageReader, axcodes, reason_of, visible_files

if TYPE_CHECKING:
    from numpy.typing import NDArray

GAP_FACTOR = 1.5  # a gap between consecutive slices this many times the usual spacing: slices are missing


def _frame_attribute(ds: Any, sequence: str, name: str) -> Any:
    """An attribute of a DICOM file, or of an enhanced multi-frame file's shared functional groups."""
    value = ds.get(name)
    if value is not None:
        return value
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        inner = shared[0].get(sequence)
        if inner:
            return inner[0].get(name)
    return None


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    """(row spacing, column spacing) in mm: PixelSpacing (or ImagerPixelSpacing on a projection image)."""
    value = _frame_attribute(ds, "PixelMeasuresSequence", "PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _slice_spacing(ds: Any) -> float | None:
    """The distance between slices the file states: SpacingBetweenSlices, else SliceThickness."""
    for name in ("SpacingBetweenSlices", "SliceThickness"):
        value = _frame_attribute(ds, "PixelMeasuresSequence", name)
        try:
            mm = float(value)
        except (TypeError, ValueError):
            continue
        if mm > 0:
            return mm
    return None


def _directions(ds: Any) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]] | None:
    """The row cosine, the column cosine and the slice normal (their cross product), in DICOM's LPS space."""
    value = _frame_attribute(ds, "PlaneOrientationSequence", "ImageOrientationPatient")
    try:
        iop = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(iop) != 6 or not all(math.isfinite(v) for v in iop):
        return None
    (rx, ry, rz), (cx, cy, cz) = iop[:3], iop[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    if math.sqrt(sum(n * n for n in normal)) < 0.5:  # not two (nearly) perpendicular unit vectors
        return None
    return (rx, ry, rz), (cx, cy, cz), normal


def _orientation(ds: Any) -> str | None:
    """nibabel's RAS+ axis codes for the column index, the row index and the slice normal (from LPS: flip x, y)."""
    import numpy as np

    directions = _directions(ds)
    if directions is None:
        return None
    affine = np.eye(4)
    for axis, vector in enumerate(directions):
        affine[:3, axis] = np.asarray(vector) * np.array([-1.0, -1.0, 1.0])
    return axcodes(affine)


def _dcmread(path: Path) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        raise ImageError(f"{path} is not a readable DICOM file (it has no DICOM header)") from None


def _pixels(ds: Any, path: Path) -> NDArray[Any]:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise ImageError(f"{path} is not a readable DICOM file (it holds no pixel data)")
    try:
        array: NDArray[Any] = ds.pixel_array
    except Exception as exc:  # pydicom's decoders raise many kinds
        raise DICOM.unreadable(path, reason_of(exc)) from None
    return array


def _frames(ds: Any) -> int:
    try:
        return int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def read_dicom(path: Path) -> Decoded:
    """One DICOM file (a multi-frame one: its frames along the first axis)."""
    ds = _dcmread(path)
    array = _pixels(ds, path)
    row_col = _pixel_spacing(ds)
    spacing: tuple[float, ...] | None = row_col
    if row_col is not None and _frames(ds) > 1:
        between = _slice_spacing(ds)
        spacing = None if between is None else (between, *row_col)  # one value per spatial axis, or none
    return Decoded(array=array, spacing=spacing, orientation=_orientation(ds))


@dataclass(frozen=True)
class _Slice:
    path: Path
    ds: Any
    array: NDArray[Any]


def read_series(folder: Path) -> Decoded:
    """A folder holding one DICOM series: its slices sorted along the slice normal, (slices, rows, cols)."""
    import numpy as np

    files = visible_files(folder)
    if not files:
        raise DICOM_SERIES.unreadable(folder, "the folder holds no files")
    slices: list[_Slice] = []
    for file in files:
        try:
            ds = _dcmread(file)
            slices.append(_Slice(file, ds, _pixels(ds, file)))
        except ImageError as exc:
            raise ImageError(f"{exc.message}, in the DICOM series {folder}") from None
        except Exception as exc:
            raise ImageError(
                f"{file} is not a readable DICOM file ({reason_of(exc)}), in the DICOM series {folder}"
            ) from None
    series = {str(s.ds.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise DICOM_SERIES.unreadable(folder, f"the folder holds {len(series)} series; it must hold one")
    first = slices[0]
    for s in slices:
        if _frames(s.ds) > 1:
            raise DICOM_SERIES.unreadable(folder, f"{s.path.name} holds {_frames(s.ds)} frames, not one slice")
        if s.array.shape != first.array.shape:
            size = "x".join(str(n) for n in s.array.shape)
            usual = "x".join(str(n) for n in first.array.shape)
            raise DICOM_SERIES.unreadable(folder, f"{s.path.name} is {size} where {first.path.name} is {usual}")
    directions = _directions(first.ds)
    if directions is not None and not all(_same_directions(_directions(s.ds), directions) for s in slices):
        raise DICOM_SERIES.unreadable(folder, "its slices do not share one orientation")
    positions = _positions(slices, directions)
    if positions is not None:
        order = sorted(range(len(slices)), key=lambda i: positions[i])
    else:
        order = sorted(range(len(slices)), key=lambda i: (_instance(slices[i].ds), slices[i].path.name))
    ordered = [slices[i] for i in order]
    warning = None
    between: float | None
    if positions is not None and len(slices) > 1:
        along = [positions[i] for i in order]
        gaps = [b - a for a, b in zip(along, along[1:], strict=False)]
        if min(gaps) < 1e-3:
            i = gaps.index(min(gaps))
            names = f"{ordered[i].path.name} and {ordered[i + 1].path.name}"
            raise DICOM_SERIES.unreadable(folder, f"{names} lie at the same position ({along[i]:.2f} mm)")
        between = round(statistics.median(gaps), 6)
        if max(gaps) > GAP_FACTOR * between:
            warning = f"missing slices: a gap of {max(gaps):.2f} mm where slices are {between:.2f} mm apart"
    else:
        between = _slice_spacing(first.ds) or 1.0
    row_col = _pixel_spacing(first.ds)
    spacing = None if row_col is None else (between, *row_col)
    array = np.stack([s.array for s in ordered])
    return Decoded(array=array, spacing=spacing, orientation=_orientation(first.ds), files=len(slices), warning=warning)


def _same_directions(a: Sequence[Sequence[float]] | None, b: Sequence[Sequence[float]]) -> bool:
    return a is not None and all(
        abs(x - y) < 1e-3 for u, v in zip(a, b, strict=True) for x, y in zip(u, v, strict=True)
    )


def _positions(slices: list[_Slice], directions: tuple[tuple[float, ...], ...] | None) -> list[float] | None:
    """Each slice's position along the slice normal (ImagePositionPatient . normal); None if one has none."""
    if directions is None:
        return None
    normal = directions[2]
    positions = []
    for s in slices:
        try:
            ipp = [float(v) for v in s.ds.get("ImagePositionPatient")]
        except (TypeError, ValueError):
            return None
        if len(ipp) != 3 or not all(math.isfinite(v) for v in ipp):
            return None
        positions.append(sum(p * n for p, n in zip(ipp, normal, strict=True)))
    return positions


def _instance(ds: Any) -> int:
    try:
        return int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        return 0


def has_dicom_header(path: Path) -> bool:
    """Whether the file starts as a DICOM file does (a 128-byte preamble, then "DICM"): a DICOM file without a
    suffix, or with one that is part of a UID-like name (1.2.840.113619.2.55.3.320)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


DICOM = ImageReader("dicom", "DICOM", "pydicom", "pydicom", read_dicom, suffixes=(".dcm",), sniff=has_dicom_header)
DICOM_SERIES = ImageReader("dicom-series", "DICOM series", "pydicom", "pydicom", read_series, folder=True)
