"""Registering imaging datasets at a site: the index, the split by patient, the inclusion report as it
leaves, the refusals that name their files, and the command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from site_agent.data.catalog import CatalogError, ImagesChanged, init_site, load_site
from site_agent.data.formats import load_table
from site_agent.data.image_datasets import add_image_dataset, load_cases
from site_agent.disclosure.guard import announced, announced_inclusion

BIN = Path(sys.executable).parent


def samples() -> list[Path]:
    import nibabel
    import pydicom

    dicom = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
    nifti = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data"
    return [dicom / "CT_small.dcm", dicom / "MR_small.dcm", nifti / "anatomical.nii", nifti / "standard.nii.gz"]


def manifest_of(folder: Path, copies: int = 3, extra: list[str] | None = None) -> Path:
    """``copies`` of each shipped sample, one patient per pair of cases (so patients have several cases)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, case = ["image,label,patient_id,age"], 0
    for copy in range(copies):
        for sample in samples():
            shutil.copy(sample, folder / f"{copy}_{sample.name}")
            rows.append(f"{copy}_{sample.name},{case % 2},p{case // 2},{40 + case}")
            case += 1
    (folder / "manifest.csv").write_text("\n".join(rows + (extra or [])) + "\n")
    return folder / "manifest.csv"


def test_a_registered_manifest_is_indexed_split_by_patient_and_read_back(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site", "A")
    site = add_image_dataset(site, "scans", manifest_of(tmp_path / "data"), train_fraction=0.5, split_seed=3)
    entry = load_site(tmp_path / "site").datasets["scans"]
    assert (entry.format, entry.rows, entry.train_rows + entry.test_rows) == ("images", 12, 12)
    assert entry.columns[:4] == ("image", "patient_id", "label", "age") and entry.dtypes[0] == "path"
    assert {"image_dim_0", "spacing_0", "intensity_mean"} <= set(entry.columns)  # what its queries may name
    assert entry.inclusion == {
        "cases": 12,
        "included": 12,
        "excluded": {},
        "patients": 6,
        "patients_with_several_cases": 6,
        "kinds": {"dicom": 6, "nifti": 6},
        "warnings": 0,
    }
    train, test = load_cases(site, "scans")
    assert {c["patient_id"] for c in train}.isdisjoint({c["patient_id"] for c in test})  # no patient on both sides
    assert set(train[0]) == {"image", "label", "patient_id", "age"} and Path(train[0]["image"]).is_file()
    table = load_table(site, "scans")  # what queries see: no paths, the measured sizes
    assert "image" not in table.columns and {"age", "image_dim_0", "spacing_0"} <= set(table.columns)
    ct = table[table.image_dim_0 == 128].iloc[0]  # CT_small.dcm: 128 x 128, HU values
    import numpy as np
    import pydicom

    pixels = pydicom.dcmread(samples()[0]).pixel_array.astype(np.float64)
    assert ct.intensity_mean == pytest.approx(pixels.mean(), abs=1e-5)
    assert ct.intensity_p99 == pytest.approx(np.percentile(pixels, 99), abs=1e-5)
    assert len(table) == 12


def test_a_file_changed_after_registration_is_refused_by_name(tmp_path: Path) -> None:
    site = add_image_dataset(init_site(tmp_path / "site", "A"), "scans", manifest_of(tmp_path / "data"))
    train, _ = load_cases(site, "scans")
    victim = Path(train[0]["image"])
    changed = bytearray(victim.read_bytes())
    changed[len(changed) // 2] ^= 0xFF  # one byte of one image
    victim.write_bytes(bytes(changed))
    with pytest.raises(ImagesChanged, match=f"{victim} changed since it was registered"):
        load_cases(site, "scans")


def test_a_manifest_with_a_corrupt_and_a_missing_file_is_refused_naming_both(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(samples()[0], data / "corrupt.dcm")
    (data / "corrupt.dcm").write_bytes((data / "corrupt.dcm").read_bytes()[:2000])
    manifest = manifest_of(data, extra=["corrupt.dcm,1,q1,50", "gone.nii.gz,0,q2,51"])
    site = init_site(tmp_path / "site", "A")
    with pytest.raises(CatalogError) as refused:
        add_image_dataset(site, "scans", manifest)
    assert str(data / "corrupt.dcm") in str(refused.value) and str(data / "gone.nii.gz") in str(refused.value)
    assert "scans" not in load_site(tmp_path / "site").datasets  # nothing registered
    kept = add_image_dataset(site, "scans", manifest, skip_bad_files=True).datasets["scans"]
    assert kept.inclusion is not None
    assert kept.inclusion["excluded"] == {"image file unreadable": 1, "image file missing": 1}
    assert kept.rows == 12


def test_the_command_line_refuses_naming_the_files_and_reports_exclusions(tmp_path: Path) -> None:
    data = tmp_path / "data"
    manifest = manifest_of(data, extra=["gone.dcm,1,q1,50", "0_MR_small.dcm,1,q2,51", "1_MR_small.dcm,,q3,52"])
    subprocess.run([BIN / "flip-site", "init", tmp_path / "site", "--name", "A"], check=True, capture_output=True)
    command = [BIN / "flip-site", "dataset", "add", tmp_path / "site", "scans", manifest, "--format", "images"]
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode != 0 and str(data / "gone.dcm") in refused.stderr and "Traceback" not in refused.stderr
    done = subprocess.run([*command, "--skip-bad-files"], capture_output=True, text=True, check=True)
    assert "12 included" in done.stdout
    for reason in ("image file missing", "image listed twice", "no label"):
        assert f"excluded: 1 ({reason})" in done.stdout
    listed = json.loads(
        subprocess.run(
            [BIN / "flip-site", "dataset", "list", tmp_path / "site", "--json"], capture_output=True, check=True
        ).stdout
    )
    assert listed[0]["inclusion"]["cases"] == 15


def test_the_inclusion_report_leaves_under_the_sites_disclosure_control() -> None:
    report = {
        "cases": 120,
        "included": 100,
        "excluded": {"no label": 3, "missing slices": 17},
        "patients": 60,
        "patients_with_several_cases": 4,
        "kinds": {"dicom-series": 97, "nifti": 3},
        "warnings": 0,
    }
    out = announced_inclusion(report, threshold=10)
    # 3 alone would be 120 - 100 - 17: its smallest complement goes with it
    assert out["excluded"] == {"no label": None, "missing slices": None} and out["included"] == 100
    assert out["patients"] == 60 and out["patients_with_several_cases"] is None
    assert out["kinds"] == {"dicom-series": None, "nifti": None}  # 3 alone would be 100 - 97
    small = announced_inclusion({**report, "cases": 8, "included": 8, "excluded": {}}, threshold=10)
    assert small["cases"] is None and small["included"] is None
    summary = announced({"name": "scans", "rows": 100, "inclusion": report}, 10)
    assert summary["inclusion"]["excluded"]["no label"] is None


def test_a_manifest_without_usable_cases_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(samples()[0], data / "a.dcm")
    (data / "manifest.csv").write_text("image,label,patient_id\na.dcm,,p1\n")
    with pytest.raises(CatalogError, match="no usable case .*1 no label"):
        add_image_dataset(init_site(tmp_path / "site", "A"), "scans", data / "manifest.csv")
