"""An imaging mock's files, written in the kernel (flip_magics.mock_images): each case's image in its form's kind,
shape and dtype, its voxels within the case's intensity summaries, read back as a real run's cell would; written once
per site, dataset and mock."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flip_magics.mock_images import mock_cases
from site_agent.data.images import decode

INTENSITY = ["intensity_mean", "intensity_std", "intensity_p1", "intensity_p99"]


def mock_of(form: dict[str, Any], cases: int = 6, mask: bool = False) -> tuple[pd.DataFrame, dict[str, Any]]:
    frame = pd.DataFrame(
        {
            **({} if mask else {"label": [i % 2 for i in range(cases)]}),
            "patient_id": [f"mock-{i:03d}" for i in range(cases)],
            "age": pd.array([50 + i if i else None for i in range(cases)], dtype="Int64"),
            "intensity_mean": [100.0] * cases,
            "intensity_std": [10.0] * cases,
            "intensity_p1": [80.0] * cases,
            "intensity_p99": [120.0] * cases,
        }
    )
    keys = [k for k in ("label", "patient_id", "age") if k in frame.columns]
    images = {"forms": [form], "form": [0] * cases, "keys": keys, "intensity": INTENSITY, "mask": mask}
    return frame, images


def test_a_png_form_is_written_as_png_and_read_back_in_its_shape_dtype_and_intensities() -> None:
    frame, images = mock_of({"kind": "png", "dtype": "uint8", "shape": [28, 30], "spacing": None, "share": 1.0})
    cases = mock_cases("Alpha", "breast-png", frame, images)
    assert len(cases) == 6 and all(Path(c["image"]).suffix == ".png" for c in cases)
    assert list(cases[1]) == ["image", "label", "patient_id", "age"]  # as a real run's case: MONAI's keys first
    assert (cases[1]["label"], cases[1]["patient_id"], cases[1]["age"], cases[0]["age"]) == (1, "mock-001", 51, None)
    pixels = decode(Path(cases[0]["image"])).array  # the site's own PNG reader
    assert pixels.shape == (28, 30) and pixels.dtype == np.uint8
    assert 80 <= pixels.min() and pixels.max() <= 120 and abs(float(pixels.mean()) - 100) < 3


def test_a_nifti_form_keeps_its_spacing_and_a_dicom_form_is_written_as_monai_reads_a_dicom() -> None:
    nifti = {"kind": "nifti", "dtype": "int16", "shape": [9, 8, 7], "spacing": [0.7, 0.7, 2.5], "share": 1.0}
    case = mock_cases("Alpha", "ct", *mock_of(nifti))[0]
    assert case["image"].endswith(".nii.gz")
    decoded = decode(Path(case["image"]))
    assert decoded.array.shape == (9, 8, 7) and decoded.array.dtype == np.int16 and decoded.spacing == (0.7, 0.7, 2.5)
    series = {"kind": "dicom-series", "dtype": "int16", "shape": [5, 16, 12], "spacing": [2.5, 0.5, 0.4], "share": 1.0}
    from monai.transforms import LoadImage

    image = LoadImage(image_only=True)(mock_cases("Alpha", "series", *mock_of(series))[0]["image"])
    assert tuple(image.shape) == (12, 16, 5)  # columns, rows, slices: a real series' shape through MONAI


def test_an_npz_form_is_one_array_and_a_mask_dataset_gets_a_mask_file_as_its_label() -> None:
    npz = {"kind": "npz", "dtype": "float32", "shape": [6, 5], "spacing": None, "share": 1.0}
    case = mock_cases("Alpha", "arrays", *mock_of(npz, mask=True))[0]
    with np.load(case["image"]) as archive:
        assert archive.files == ["image"] and archive["image"].shape == (6, 5)
    assert list(case) == ["image", "label", "patient_id", "age"]
    with np.load(case["label"]) as archive:
        assert archive["image"].shape == (6, 5) and set(np.unique(archive["image"])) == {0, 1}


def test_the_files_are_written_once_per_mock_and_again_when_the_mock_changes() -> None:
    form = {"kind": "png", "dtype": "uint8", "shape": [8, 8], "spacing": None, "share": 1.0}
    frame, images = mock_of(form)
    first = mock_cases("Beta", "reuse", frame, images)
    written = Path(first[0]["image"]).stat().st_mtime_ns
    again = mock_cases("Beta", "reuse", frame, images)
    assert again == first and again[0] is not first[0]  # the same files, fresh dictionaries
    assert Path(again[0]["image"]).stat().st_mtime_ns == written
    changed = mock_cases("Beta", "reuse", frame.assign(intensity_mean=110.0), images)
    assert Path(changed[0]["image"]).parent != Path(first[0]["image"]).parent
