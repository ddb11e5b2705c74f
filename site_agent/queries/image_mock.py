"""A synthetic mock of a site's imaging dataset, made at the site, for researchers to dry-run their cells against.

An imaging mock is the mock of the dataset's cases' table (:func:`site_agent.queries.mock.make_mock` over what
queries see: the label, the clinical columns, each image's dimensions, spacing and intensity summaries, each column
drawn on its own under the site's threshold) and the image *forms* the kernel writes each mock case's file in
(``flip_magics.mock_images``): what releases beside the table is

- each form: a file kind, a dtype and a shape that at least ``threshold`` cases share; the cases whose exact shape
  fewer share are counted again with each axis of :data:`COARSE_FROM` or more rounded to a multiple of
  :data:`COARSE_STEP` (a CT's slice count), and such a coarse shape is a form where at least ``threshold`` of them
  share it; cases of no form never appear. Each form's share is rounded to two significant figures, and it carries
  the spacing (each axis rounded to two significant figures) at least ``threshold`` of its cases share, else none;
- for each mock case, which form its image takes, drawn by those shares independently of its other columns (its
  dimensions and spacing columns are then the form's).

No path, fingerprint, orientation, patient id or file of the site leaves. At most :data:`MAX_CASES` mock cases leave
(fewer for large images: :data:`VOXEL_BUDGET`): a dry run is for finding bugs, not accuracy.

Pure: numpy and pandas, no I/O. The caller seeds it per site, dataset and threshold.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from site_agent.data.image_datasets import (
    INTENSITY_COLUMNS,
    LABEL_KEY,
    PATIENT_KEY,
    SHAPE_COLUMNS,
    SPACING_COLUMNS,
)
from site_agent.queries.mock import MockRefused, make_mock

MAX_CASES = 64  # mock cases a site sends of an imaging dataset
MIN_CASES = 10  # however large its images: enough for a train and a test part
VOXEL_BUDGET = 1 << 27  # the most voxels of the largest form times the cases, above MIN_CASES (about 128 million)
COARSE_FROM, COARSE_STEP = 32, 16  # a rarer shape's axis of 32 or more, rounded to a multiple of 16

FormKey = tuple[str, str, tuple[int, ...]]  # (kind, dtype, shape)


@dataclass(frozen=True)
class ImageForm:
    """One form a mock case's image takes: its file kind (``png``, ``nifti``, ...), dtype and shape, with the
    spacing enough of its cases share (None: not released) and its share of the mock's cases."""

    kind: str
    dtype: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    share: float

    @property
    def voxels(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "share": self.share,
        }


def image_forms(index: dict[str, Any], threshold: int) -> list[ImageForm]:
    """The forms an index's images may take in a mock (see the module): each shared by at least ``threshold``
    cases, most common first."""
    infos = [case["image_info"] for case in index["cases"]]
    exact = Counter(_key(info) for info in infos)
    groups: dict[FormKey, list[dict[str, Any]]] = {}
    for info in infos:
        key = _key(info)
        if exact[key] < threshold:
            key = (key[0], key[1], _coarse(key[2]))
        groups.setdefault(key, []).append(info)
    kept = {key: members for key, members in groups.items() if len(members) >= threshold}
    if not kept:
        return []
    shares = {key: float(f"{len(members) / len(infos):.1e}") for key, members in kept.items()}  # 2 significant
    total = sum(shares.values())
    forms = [
        ImageForm(kind, dtype, shape, _spacing(kept[(kind, dtype, shape)], threshold), share / total)
        for (kind, dtype, shape), share in shares.items()
    ]
    return sorted(forms, key=lambda f: (-f.share, f.kind, f.dtype, f.shape))


def make_image_mock(
    index: dict[str, Any], table: pd.DataFrame, threshold: int, seed: int
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The mock of an imaging dataset: its cases' table (``table``, as queries see it) mocked, at most
    :data:`MAX_CASES` rows, each case's dimensions and spacing those of the form drawn for its image; and what the
    kernel writes the images from: ``forms``, each case's ``form``, the columns a case's dictionary holds
    (``keys``), the columns of its intensity summaries (``intensity``) and whether its label is a ``mask``.

    The same index, threshold and seed give the same mock. Raises :class:`MockRefused` (a sentence) when no form
    is shared by ``threshold`` cases, or the table is refused a mock (:func:`make_mock`)."""
    forms = image_forms(index, threshold)
    if not forms:
        raise MockRefused(
            f"no image kind, dtype and shape is shared by at least {threshold} cases, so the site makes no imaging "
            "mock (it would show a rarer image's form)"
        )
    largest = max(form.voxels for form in forms)
    mock = make_mock(table, threshold, seed)
    cases = min(MAX_CASES, len(mock), max(MIN_CASES, VOXEL_BUDGET // max(1, largest)))
    mock = mock.head(cases).copy()
    rng = np.random.default_rng([seed, 1])
    chosen = rng.choice(len(forms), size=cases, p=np.array([form.share for form in forms]))
    drawn = [forms[i] for i in chosen]
    for axis, column in enumerate(SHAPE_COLUMNS):
        mock[column] = [float(f.shape[axis]) if axis < len(f.shape) else np.nan for f in drawn]
    for axis, column in enumerate(SPACING_COLUMNS):
        mock[column] = [_axis(f.spacing, axis) for f in drawn]
    mock[PATIENT_KEY] = [f"mock-{i + 1:03d}" for i in range(cases)]
    clinical = [str(c) for c in index["columns"]]
    keys = [c for c in (LABEL_KEY, PATIENT_KEY, *clinical) if c in mock.columns]
    images = {
        "forms": [form.to_json() for form in forms],
        "form": [int(i) for i in chosen],
        "keys": list(dict.fromkeys(keys)),
        "intensity": list(INTENSITY_COLUMNS),
        "mask": index["mask_column"] is not None,
    }
    return mock.reset_index(drop=True), images


def _key(info: dict[str, Any]) -> FormKey:
    return str(info["kind"]), str(info["dtype"]), tuple(int(n) for n in info["shape"])


def _coarse(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n if n < COARSE_FROM else int(round(n / COARSE_STEP)) * COARSE_STEP for n in shape)


def _spacing(members: list[dict[str, Any]], threshold: int) -> tuple[float, ...] | None:
    """The spacing (each axis to two significant figures) at least ``threshold`` of a form's cases share."""
    spacings = Counter(
        tuple(float(f"{float(s):.2g}") for s in info["spacing"]) for info in members if info.get("spacing")
    )
    if not spacings:
        return None
    spacing, count = spacings.most_common(1)[0]
    return spacing if count >= threshold else None


def _axis(spacing: tuple[float, ...] | None, axis: int) -> float:
    return float(spacing[axis]) if spacing is not None and axis < len(spacing) else np.nan
