"""site_agent.data.images on real files: the sample images pydicom and nibabel ship, and PNG/NPZ files written here."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from site_agent.data import images, manifests
from site_agent.data.images import (
    KINDS,
    ImageError,
    ImageInfo,
    fingerprint_of,
    image_kind,
    load_array,
    read_image_info,
    verify_fingerprint,
)
from site_agent.data.manifests import check_manifest


@pytest.fixture(scope="module")
def dicom_data() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files"


@pytest.fixture(scope="module")
def nifti_data() -> Path:
    import nibabel

    return Path(nibabel.__file__).parent / "tests" / "data"


@pytest.fixture
def ct5n(tmp_path: Path, dicom_data: Path) -> Path:
    """A regular series: 5 axial slices of 16x16, 2.5 mm apart (positions -1.24 to 8.76 mm)."""
    return Path(shutil.copytree(dicom_data / "dicomdirtests" / "98892001" / "CT5N", tmp_path / "ct5n"))


@pytest.fixture
def gapped(tmp_path: Path, dicom_data: Path) -> Path:
    """CT5N without its middle slice (2693, at 3.76 mm): a 5 mm gap among 2.5 mm steps."""
    folder = Path(shutil.copytree(dicom_data / "dicomdirtests" / "98892001" / "CT5N", tmp_path / "gapped"))
    (folder / "2693").unlink()
    return folder


def write_png(path: Path, shape: tuple[int, ...] = (12, 10), dtype: str = "uint8") -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray((np.arange(math.prod(shape)) % 200).astype(dtype).reshape(shape)).save(path)
    return path


def write_npz(path: Path, **arrays: Any) -> Path:
    import numpy as np

    np.savez_compressed(path, **arrays)
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- each kind ----


def test_nifti_info(nifti_data: Path) -> None:
    info = read_image_info(nifti_data / "anatomical.nii")
    assert info.kind == "nifti"
    assert info.shape == (33, 41, 25)
    assert info.spacing == (2.0, 2.0, 2.0)
    assert info.orientation == "LAS"
    assert info.dtype == "int16"  # stored big-endian (>i2); the name is the dtype's, not its byte order
    assert info.files == 1 and info.warning is None
    assert info.path == str((nifti_data / "anatomical.nii").resolve())
    assert info.fingerprint == fingerprint_of(nifti_data / "anatomical.nii")

    four_d = read_image_info(nifti_data / "example4d.nii.gz")
    assert four_d.shape == (128, 96, 24, 2)
    assert four_d.spacing == (2.0, 2.0, 2.199999)  # the spatial axes only; float32's shortest form
    assert four_d.orientation == "LAS"

    standard = read_image_info(nifti_data / "standard.nii.gz")
    assert (standard.shape, standard.spacing, standard.orientation, standard.dtype) == (
        (4, 5, 7),
        (1.0, 3.0, 2.0),
        "RAS",
        "uint8",
    )


def test_dicom_file_info(dicom_data: Path) -> None:
    ct = read_image_info(dicom_data / "CT_small.dcm")
    assert (ct.kind, ct.shape, ct.dtype, ct.files) == ("dicom", (128, 128), "int16", 1)
    assert ct.spacing == pytest.approx((0.661468, 0.661468))
    # IOP [1,0,0, 0,1,0]: the column index runs to the patient's left, the row index to posterior, the normal
    # to superior; the codes are for (column, row, normal), DICOM's x, y, z
    assert ct.orientation == "LPS"

    mr = read_image_info(dicom_data / "MR_small.dcm")
    assert (mr.shape, mr.spacing, mr.orientation, mr.dtype) == ((64, 64), (0.3125, 0.3125), "LPS", "int16")


def test_dicom_series_info_and_slice_order(ct5n: Path) -> None:
    import numpy as np
    import pydicom

    info = read_image_info(ct5n)
    assert info.kind == "dicom-series"
    assert info.shape == (5, 16, 16)
    assert info.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert info.orientation == "LPS"
    assert (info.files, info.warning, info.dtype) == (5, None, "int16")
    # sorted along the normal (superior): the slice at -1.24 mm (file 3353, instance 10) first, 8.76 mm (2062) last
    array = load_array(ct5n)
    assert array.shape == info.shape
    assert np.array_equal(array[0], pydicom.dcmread(ct5n / "3353").pixel_array)
    assert np.array_equal(array[-1], pydicom.dcmread(ct5n / "2062").pixel_array)


def test_a_series_of_one_slice_takes_its_slice_thickness(tmp_path: Path, dicom_data: Path) -> None:
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(dicom_data / "dicomdirtests" / "77654033" / "CT2" / "17136", folder / "17136")
    info = read_image_info(folder)
    assert info.shape == (1, 16, 16) and info.files == 1 and info.warning is None
    assert info.spacing == pytest.approx((1.25, 0.488281, 0.488281))


def test_a_series_with_missing_slices_carries_a_warning(gapped: Path, tmp_path: Path, dicom_data: Path) -> None:
    info = read_image_info(gapped)
    assert info.shape == (4, 16, 16)
    assert info.spacing == pytest.approx((2.5, 0.488281, 0.488281))  # the median step
    assert info.warning == "missing slices: a gap of 5.00 mm where slices are 2.50 mm apart"
    # CT2's first slice lies far from the other three (-99.48 mm against 103.02, 104.27, 105.52)
    ct2 = read_image_info(Path(shutil.copytree(dicom_data / "dicomdirtests" / "77654033" / "CT2", tmp_path / "ct2")))
    assert ct2.warning == "missing slices: a gap of 202.50 mm where slices are 1.25 mm apart"


def test_a_series_folder_must_hold_dicom_slices_of_one_series(ct5n: Path, dicom_data: Path) -> None:
    (ct5n / ".DS_Store").write_bytes(b"hidden files are not slices")
    assert read_image_info(ct5n).files == 5
    (ct5n / "notes.txt").write_text("not a slice")
    with pytest.raises(ImageError, match=r"notes\.txt is not a readable DICOM file .*in the DICOM series .*ct5n"):
        read_image_info(ct5n)
    (ct5n / "notes.txt").unlink()
    shutil.copy(dicom_data / "dicomdirtests" / "77654033" / "CT2" / "17136", ct5n / "17136")
    with pytest.raises(ImageError, match=r"ct5n is not a readable DICOM series \(the folder holds 2 series"):
        read_image_info(ct5n)


def test_png_info(tmp_path: Path) -> None:
    gray = read_image_info(write_png(tmp_path / "gray.png"))
    assert (gray.kind, gray.shape, gray.spacing, gray.orientation, gray.dtype) == ("png", (12, 10), None, None, "uint8")
    rgb = read_image_info(write_png(tmp_path / "rgb.png", (6, 8, 3)))
    assert rgb.shape == (6, 8, 3)
    deep = read_image_info(write_png(tmp_path / "deep.png", (5, 7), "uint16"))
    assert (deep.shape, deep.dtype) == ((5, 7), "uint16")


def test_npz_info(tmp_path: Path) -> None:
    import numpy as np

    named = write_npz(tmp_path / "a.npz", image=np.zeros((4, 5, 6), "float32"), spacing=np.array([1.5, 0.5, 0.5]))
    info = read_image_info(named)
    assert (info.kind, info.shape, info.spacing, info.orientation, info.dtype) == (
        "npz",
        (4, 5, 6),
        (1.5, 0.5, 0.5),
        None,
        "float32",
    )
    only = read_image_info(write_npz(tmp_path / "b.npz", volume=np.ones((3, 3), "int8")))
    assert (only.shape, only.spacing, only.dtype) == ((3, 3), None, "int8")
    several = write_npz(tmp_path / "c.npz", ct=np.ones((3, 3)), pet=np.ones((3, 3)))
    with pytest.raises(ImageError, match=r"c\.npz is not a readable NPZ file \(it holds several arrays, ct, pet"):
        read_image_info(several)


def test_image_kind_by_name(tmp_path: Path, dicom_data: Path, nifti_data: Path, ct5n: Path) -> None:
    bare = tmp_path / "IM0001"
    shutil.copy(dicom_data / "CT_small.dcm", bare)
    assert image_kind(bare) == "dicom"  # no suffix, but a DICOM header
    assert read_image_info(bare).shape == (128, 128)
    assert image_kind(ct5n) == "dicom-series"
    upper = tmp_path / "A.NII.GZ"
    shutil.copy(nifti_data / "standard.nii.gz", upper)
    assert image_kind(upper) == "nifti"
    assert [image_kind(write_png(tmp_path / "x.png")), image_kind(write_npz(tmp_path / "x.npz", a=[[1]]))] == [
        "png",
        "npz",
    ]
    (tmp_path / "README").write_text("not an image")
    with pytest.raises(ImageError, match="README is not a supported image file"):
        image_kind(tmp_path / "README")
    with pytest.raises(ImageError, match=r"nothing\.nii\.gz is missing"):
        image_kind(tmp_path / "nothing.nii.gz")


def test_an_unsupported_suffix_is_refused_naming_the_kinds(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not really")
    with pytest.raises(ImageError) as caught:
        read_image_info(photo)
    message = str(caught.value)
    assert str(photo) in message and "'.jpg'" in message
    assert all(kind in message for kind in KINDS)


# ---- fingerprints ----


def test_fingerprint_of_a_file_is_its_sha256_and_changes_with_a_byte(tmp_path: Path, dicom_data: Path) -> None:
    copy = tmp_path / "ct.dcm"
    shutil.copy(dicom_data / "CT_small.dcm", copy)
    first = fingerprint_of(copy)
    assert first == "sha256:" + hashlib.sha256(copy.read_bytes()).hexdigest()
    assert fingerprint_of(copy) == first
    data = bytearray(copy.read_bytes())
    data[-1] ^= 0xFF
    copy.write_bytes(bytes(data))
    assert fingerprint_of(copy) != first


def test_fingerprint_of_a_series_hashes_each_slice_by_name(ct5n: Path) -> None:
    names = sorted(p.name for p in ct5n.iterdir())
    lines = "".join(f"{n}\0{hashlib.sha256((ct5n / n).read_bytes()).hexdigest()}\n" for n in names)
    first = fingerprint_of(ct5n)
    assert first == "sha256:" + hashlib.sha256(lines.encode()).hexdigest()
    assert read_image_info(ct5n).fingerprint == first
    (ct5n / ".hidden").write_text("ignored")
    assert fingerprint_of(ct5n) == first
    (ct5n / "2392").rename(ct5n / "2392b")
    assert fingerprint_of(ct5n) != first


def test_verify_fingerprint(tmp_path: Path, nifti_data: Path) -> None:
    copy = tmp_path / "anatomical.nii"
    shutil.copy(nifti_data / "anatomical.nii", copy)
    registered = read_image_info(copy).fingerprint
    verify_fingerprint(copy, registered)
    with open(copy, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ImageError, match=r"anatomical\.nii changed since it was registered \(fingerprint differs\)"):
        verify_fingerprint(copy, registered)
    copy.unlink()
    with pytest.raises(ImageError, match=r"anatomical\.nii is gone"):
        verify_fingerprint(copy, registered)


# ---- bad files ----


def test_corrupt_files_are_refused_by_name(tmp_path: Path, dicom_data: Path) -> None:
    data = (dicom_data / "CT_small.dcm").read_bytes()
    half = tmp_path / "half.dcm"
    half.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(os.urandom(2048))
    noise = tmp_path / "noise.png"
    noise.write_bytes(os.urandom(2048))
    for path, kind in ((half, "DICOM"), (garbage, "NIfTI"), (noise, "PNG")):
        with pytest.raises(ImageError) as caught:
            read_image_info(path)
        assert str(caught.value).startswith(f"{path} is not a readable {kind} file (")
        with pytest.raises(ImageError, match=f"not a readable {kind} file"):
            load_array(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^.*scan\.nii\.gz is missing$"):
        read_image_info(tmp_path / "scan.nii.gz")


def test_image_info_round_trips_through_json(ct5n: Path) -> None:
    info = read_image_info(ct5n)
    stored = json.loads(json.dumps(info.to_json()))
    assert stored["shape"] == [5, 16, 16] and isinstance(stored["spacing"], list)
    assert ImageInfo.from_json(stored) == info


# ---- manifests ----


@pytest.fixture
def cases_dir(tmp_path: Path, dicom_data: Path, nifti_data: Path, ct5n: Path, gapped: Path) -> Path:
    """A folder of images beside which manifests are written: a.nii, b.nii.gz, c.dcm, d.png, e.npz, ct5n/, gapped/."""
    import numpy as np

    shutil.copy(nifti_data / "anatomical.nii", tmp_path / "a.nii")
    shutil.copy(nifti_data / "standard.nii.gz", tmp_path / "b.nii.gz")
    shutil.copy(dicom_data / "CT_small.dcm", tmp_path / "c.dcm")
    write_png(tmp_path / "d.png")
    write_npz(tmp_path / "e.npz", image=np.zeros((3, 4, 5), "int16"))
    return tmp_path


def test_a_manifest_with_bad_files_is_refused_naming_each(cases_dir: Path) -> None:
    (cases_dir / "broken.png").write_bytes(b"not a png at all")
    manifest = write_csv(
        cases_dir / "manifest.csv",
        "image,patient_id\na.nii,p1\ngone.nii.gz,p2\nbroken.png,p3\nb.nii.gz,p4\nalso-gone.dcm,p5\n",
    )
    with pytest.raises(ImageError) as caught:
        check_manifest(manifest)
    message = str(caught.value)
    assert message.startswith(
        f"the manifest {manifest} cannot be registered: 3 of its files are missing or unreadable: "
    )
    assert f"row 2: {cases_dir / 'gone.nii.gz'} is missing" in message
    assert f"row 3: {cases_dir / 'broken.png'} is not a readable PNG file (" in message
    assert f"row 5: {cases_dir / 'also-gone.dcm'} is missing" in message
    assert "a.nii" not in message and "b.nii.gz" not in message


def test_skip_bad_files_excludes_their_rows(cases_dir: Path) -> None:
    (cases_dir / "broken.png").write_bytes(b"not a png at all")
    manifest = write_csv(
        cases_dir / "manifest.csv",
        "image,patient_id,mask\na.nii,p1,a.nii\ngone.nii.gz,p2,a.nii\nbroken.png,p3,a.nii\nb.nii.gz,p4,no-mask.nii\n",
    )
    checked = check_manifest(manifest, mask_column="mask", skip_bad_files=True)
    assert [c["row"] for c in checked.cases] == [0]
    assert checked.excluded == [
        {"row": 1, "reason": "image file missing"},
        {"row": 2, "reason": "image file unreadable"},
        {"row": 3, "reason": "mask file missing"},
    ]
    assert checked.report["excluded"] == {"image file missing": 1, "image file unreadable": 1, "mask file missing": 1}
    assert checked.report["cases"] == 4 and checked.report["included"] == 1


def test_exclusions_and_the_report(cases_dir: Path) -> None:
    manifest = write_csv(
        cases_dir / "manifest.csv",
        "image,patient_id,label\n"
        "a.nii,p1,1\n"  # 0: included
        ",p2,0\n"  # 1: no image
        "b.nii.gz,,1\n"  # 2: no patient id
        "c.dcm,p3,\n"  # 3: no label
        "a.nii,p4,0\n"  # 4: listed twice
        "gapped,p5,1\n"  # 5: missing slices
        "ct5n,p1,0\n"  # 6: included, p1's second case
        "d.png,p6,1\n"  # 7: included
        "e.npz,p7,0\n",  # 8: included
    )
    checked = check_manifest(manifest, label_column="label")
    assert [c["row"] for c in checked.cases] == [0, 6, 7, 8]
    assert checked.excluded == [
        {"row": 1, "reason": "no image"},
        {"row": 2, "reason": "no patient id"},
        {"row": 3, "reason": "no label"},
        {"row": 4, "reason": "image listed twice"},
        {"row": 5, "reason": "missing slices"},
    ]
    assert checked.report == {
        "cases": 9,
        "included": 4,
        "excluded": {"no image": 1, "no patient id": 1, "no label": 1, "image listed twice": 1, "missing slices": 1},
        "patients": 3,
        "patients_with_several_cases": 1,
        "kinds": {"nifti": 1, "dicom-series": 1, "png": 1, "npz": 1},
        "warnings": 0,
    }
    case = checked.cases[1]
    assert case["image"] == str(cases_dir / "ct5n") and case["label"] == 0 and case["patient_id"] == "p1"
    assert case["mask"] is None and case["mask_info"] is None
    assert ImageInfo.from_json(case["image_info"]).shape == (5, 16, 16)
    json.dumps(checked.cases)  # JSON-native throughout


def test_relative_paths_are_resolved_against_the_manifest_folder(
    cases_dir: Path, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = cases_dir / "lists"
    listing.mkdir()
    manifest = write_csv(listing / "m.csv", f"image,patient_id\n../a.nii,1\n{cases_dir / 'd.png'},2\n")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    checked = check_manifest(Path(os.path.relpath(manifest)))
    assert [c["image"] for c in checked.cases] == [str(cases_dir / "a.nii"), str(cases_dir / "d.png")]
    assert checked.cases[0]["image_info"]["path"] == str(cases_dir / "a.nii")


def test_clinical_columns_are_json_native(cases_dir: Path) -> None:
    manifest = write_csv(
        cases_dir / "manifest.csv",
        "patient_id,image,age,weight,sex,smoker,site\n7,a.nii,63,71.5,F,True,north\n007,d.png,,80.25,M,False,\n",
    )
    checked = check_manifest(manifest)
    assert checked.columns == ("age", "weight", "sex", "smoker", "site")
    assert [c["patient_id"] for c in checked.cases] == ["7", "007"]  # ids are text: a leading zero stays
    assert checked.cases[0]["clinical"] == {"age": 63.0, "weight": 71.5, "sex": "F", "smoker": True, "site": "north"}
    assert checked.cases[1]["clinical"] == {"age": None, "weight": 80.25, "sex": "M", "smoker": False, "site": None}
    for case in checked.cases:
        assert all(type(v) in (int, float, str, bool, type(None)) for v in case["clinical"].values())
        assert case["label"] is None


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (("1", "0", ""), [1, 0]),  # integers
        (("1.0", "2.0", ""), [1, 2]),  # whole numbers read as floats (the empty cell makes the column float)
        (("0.5", "2", "1"), [0.5, 2.0, 1.0]),  # other numbers
        (("benign", "malignant", "3"), ["benign", "malignant", "3"]),  # text
    ],
)
def test_label_types(cases_dir: Path, values: tuple[str, str, str], expected: list[Any]) -> None:
    rows = "".join(
        f"{image},p{i},{v}\n" for i, (image, v) in enumerate(zip(("a.nii", "d.png", "e.npz"), values, strict=True))
    )
    manifest = write_csv(cases_dir / "manifest.csv", "image,patient_id,label\n" + rows)
    checked = check_manifest(manifest, label_column="label")
    got = [c["label"] for c in checked.cases]
    assert got == expected and [type(v) for v in got] == [type(v) for v in expected]


def test_masks_are_read_like_images_each_file_once(cases_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    real = images.read_image_info

    def counting(path: Path) -> ImageInfo:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(manifests, "read_image_info", counting)
    shutil.copy(cases_dir / "a.nii", cases_dir / "a2.nii")
    manifest = write_csv(
        cases_dir / "manifest.csv", "image,patient_id,seg\na.nii,1,b.nii.gz\na2.nii,2,b.nii.gz\nd.png,3,\n"
    )
    checked = check_manifest(manifest, mask_column="seg")
    assert [c["mask"] for c in checked.cases] == [str(cases_dir / "b.nii.gz")] * 2
    assert checked.cases[0]["mask_info"]["shape"] == [4, 5, 7]
    assert checked.excluded == [{"row": 2, "reason": "no mask"}]
    assert checked.columns == ()
    assert sorted(p.name for p in reads) == ["a.nii", "a2.nii", "b.nii.gz"]


def test_a_missing_column_is_named_with_those_the_manifest_has(cases_dir: Path) -> None:
    manifest = write_csv(cases_dir / "manifest.csv", "file,patient_id,age\na.nii,1,3\n")
    with pytest.raises(ImageError, match=r"has no column 'image' \(it has: file, patient_id, age\)"):
        check_manifest(manifest)
    with pytest.raises(ImageError, match=r"has no column 'diagnosis' \(it has: file, patient_id, age\)"):
        check_manifest(manifest, image_column="file", label_column="diagnosis")
    with pytest.raises(ImageError, match="choose one"):
        check_manifest(manifest, image_column="file", label_column="age", mask_column="age")


def test_an_unreadable_manifest_is_named(tmp_path: Path) -> None:
    empty = write_csv(tmp_path / "empty.csv", "")
    with pytest.raises(ImageError, match=re.escape(f"the manifest {empty} cannot be read")):
        check_manifest(empty)
    with pytest.raises(ImageError, match=r"nope\.csv is missing"):
        check_manifest(tmp_path / "nope.csv")


def test_the_module_imports_no_heavy_library() -> None:
    heavy = "{'numpy', 'pandas', 'nibabel', 'pydicom', 'PIL'}"
    code = f"import sys, site_agent.data.images; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[3]
    )
    assert out.stdout.strip() == "[]"


# ---- the contract with the cells: MONAI reads what registration accepts ----


def test_monai_loads_what_is_accepted(nifti_data: Path, tmp_path: Path, ct5n: Path) -> None:
    import warnings

    from monai.transforms.io.array import LoadImage

    png = write_png(tmp_path / "slice.png", (12, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's note that no GPU DICOM decoder is installed
        loaded = {
            "nifti": LoadImage(image_only=True)(str(nifti_data / "anatomical.nii")),
            "png": LoadImage(image_only=True)(str(png)),
            "series": LoadImage(reader="PydicomReader", image_only=True)(str(ct5n)),
        }
    infos = {"nifti": nifti_data / "anatomical.nii", "png": png, "series": ct5n}
    for name, array in loaded.items():
        assert array.numel() == math.prod(read_image_info(infos[name]).shape), name
