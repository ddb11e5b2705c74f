"""An imaging dataset's mock as a cell reads it: synthetic image files, written in this kernel for a dry run.

A site's imaging mock (made there: ``site_agent.queries.image_mock``) is a table of synthetic cases and the image
forms (file kind, dtype, shape, spacing) that at least its threshold of cases share, with the form each mock case
takes. :func:`mock_cases` writes each case's image to a temporary folder, noise drawn to the case's intensity
summaries (mean and standard deviation, within its 1st..99th percentiles) in its form's shape and dtype, and returns
the cases as a real run's cell gets them (``data.train``, ``data.test``): dictionaries with the image's path under
``image``, then ``label`` (a class, or a mask file's path), ``patient_id`` and the clinical columns, as MONAI's
dictionary transforms (``LoadImaged``) read them.

A file is written in the kind the site registered where a writer is at hand: PNG with pillow (2-D 8- or 16-bit,
or 8-bit colour), NPZ for NPZ, else NIfTI with nibabel where it is installed, else NPZ; a DICOM form is written with
its axes reversed, as MONAI reads a DICOM file (columns, rows, slices). The files are written once per kernel for a
site's dataset and mock, and reused. No IPython here.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IMAGE_KEY, LABEL_KEY = "image", "label"
DICOM_KINDS = ("dicom", "dicom-series")
FALLBACK_RANGE = {"u1": (0.0, 255.0), "i": (0.0, 1000.0), "u": (0.0, 1000.0)}  # where a mock case has no summaries

_lock = threading.Lock()
_written: dict[tuple[str, str], tuple[str, tempfile.TemporaryDirectory[str], list[dict[str, Any]]]] = {}


def mock_cases(site: str, dataset: str, frame: pd.DataFrame, images: dict[str, Any]) -> list[dict[str, Any]]:
    """``site``'s mock of imaging dataset ``dataset`` as a cell's cases (see the module): its table ``frame`` and its
    ``images`` (the forms and each case's form), the files written on the first call and reused while the mock is
    the same. Each call returns fresh dictionaries (a cell may change them)."""
    digest = hashlib.sha256(
        json.dumps([frame.to_json(orient="split"), images], sort_keys=True, default=str).encode()
    ).hexdigest()
    with _lock:
        held = _written.get((site, dataset))
        if held is None or held[0] != digest:
            folder = tempfile.TemporaryDirectory(prefix=f"flip-mock-{dataset}-{site}-")
            rng = np.random.default_rng(int(digest[:16], 16))
            held = (digest, folder, _write(Path(folder.name), frame, images, rng))
            _written[(site, dataset)] = held  # an older mock's folder goes with its TemporaryDirectory
        return [dict(case) for case in held[2]]


def _write(folder: Path, frame: pd.DataFrame, images: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    forms, keys, mask = images["forms"], list(images["keys"]), bool(images.get("mask"))
    intensity = list(images.get("intensity") or ())
    cases: list[dict[str, Any]] = []
    for number, (row, chosen) in enumerate(zip(frame.to_dict("records"), images["form"], strict=True)):
        form = forms[int(chosen)]
        summary = [_number(row.get(column)) for column in intensity[:4]]
        voxels = _voxels(form, summary, rng)
        case: dict[str, Any] = {IMAGE_KEY: str(save_image(folder / f"case-{number:03d}", voxels, form))}
        if mask:
            case[LABEL_KEY] = str(save_image(folder / f"mask-{number:03d}", _mask(voxels.shape), form))
        case.update({key: _plain(row.get(key)) for key in keys})
        cases.append(case)
    return cases


def _voxels(form: dict[str, Any], summary: list[float | None], rng: np.random.Generator) -> np.ndarray:
    """Noise in the form's shape and dtype: normal around the case's mean with its standard deviation, clipped to
    its 1st..99th percentiles (or, where the mock holds none of them, to a range for its dtype)."""
    dtype, shape = np.dtype(form["dtype"]), tuple(int(n) for n in form["shape"])
    mean, std, p1, p99 = (summary + [None] * 4)[:4]
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    low, high = _range(dtype, p1, p99)
    centre = mean if mean is not None and low <= mean <= high else (low + high) / 2
    spread = std if std is not None and std >= 0 else (high - low) / 6
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(spread) + np.float32(centre)
    np.clip(values, low, high, out=values)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        whole: np.ndarray = np.clip(np.rint(values), info.min, info.max).astype(dtype)
        return whole
    return values.astype(dtype)


def _range(dtype: np.dtype[Any], p1: float | None, p99: float | None) -> tuple[float, float]:
    if p1 is not None and p99 is not None:
        return min(p1, p99), max(p1, p99)
    key = "u1" if dtype == np.uint8 else dtype.kind
    return FALLBACK_RANGE.get(key, (0.0, 1.0))


def _mask(shape: tuple[int, ...]) -> np.ndarray:
    """A mask in the image's shape: 1 inside a box over the middle half of each axis, 0 elsewhere."""
    out = np.zeros(shape, dtype=np.uint8)
    out[tuple(slice(n // 4, max(n // 4 + 1, 3 * n // 4)) for n in shape)] = 1
    return out


def save_image(stem: Path, array: np.ndarray, form: dict[str, Any]) -> Path:
    """``array`` written as the form's kind where a writer is at hand (see the module); the file's path."""
    kind = str(form["kind"])
    if kind == "png" and _png_writable(array) and _installed("PIL"):
        from PIL import Image

        path = stem.with_suffix(".png")
        Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG")
        return path
    spacing = [float(s) for s in form.get("spacing") or ()]
    if kind in DICOM_KINDS:  # as MONAI reads a DICOM file: columns, rows, slices
        array, spacing = np.ascontiguousarray(array.transpose()), spacing[::-1]
    if kind != "npz" and _installed("nibabel") and (nifti := _save_nifti(stem, array, spacing)) is not None:
        return nifti
    path = stem.with_suffix(".npz")
    np.savez(path, image=array)  # one array, as MONAI's NumpyReader reads it
    return path


def _png_writable(array: np.ndarray) -> bool:
    grey = array.ndim == 2 and array.dtype in (np.uint8, np.uint16)
    return grey or (array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8)


def _save_nifti(stem: Path, array: np.ndarray, spacing: list[float]) -> Path | None:
    """A NIfTI file with the spacing as its zooms; None when NIfTI cannot hold the array's dtype."""
    import nibabel

    zooms = (spacing + [1.0] * 3)[:3]
    affine = np.diag([*zooms, 1.0])
    try:
        image = nibabel.Nifti1Image(array.astype(np.uint8) if array.dtype == bool else array, affine)  # type: ignore[no-untyped-call]
    except nibabel.spatialimages.HeaderDataError:
        return None
    path = stem.parent / f"{stem.name}.nii.gz"
    nibabel.save(image, path)
    return path


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _number(value: Any) -> float | None:
    if value is None or value is pd.NA:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _plain(value: Any) -> Any:
    """A mock column's value as a real case holds it (from JSON): a Python scalar, missing as None."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value
