"""The image readers a site knows, by name (``site_agent.data.images.READERS``): an unknown name refused with the
known ones, a name registered once, and a reader whose package is not installed saying so, by name, rather than
calling the file unreadable."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from site_agent.data.images import KINDS, READERS, decode, image_kind, read_image_info
from site_agent.data.manifests import check_manifest
from site_agent.data.readers import NIFTI, ImageError, ReaderUnavailable


def test_the_readers_are_registered_by_name_in_their_order() -> None:
    assert READERS.names() == KINDS == ("nifti", "dicom", "dicom-series", "png", "npz")


def test_an_unknown_reader_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    scan = tmp_path / "scan.jpg"
    scan.write_bytes(b"\xff\xd8\xff")
    known = re.escape("unknown image reader 'jpeg': the known ones are nifti, dicom, dicom-series, png, npz")
    with pytest.raises(ImageError, match=known):
        decode(scan, reader="jpeg")


def test_a_reader_name_is_registered_once() -> None:
    with pytest.raises(ImageError, match="image reader 'nifti' is registered already"):
        READERS.register("nifti", NIFTI)
    assert READERS.get("nifti") is NIFTI


@pytest.mark.parametrize(
    ("name", "module", "sentence"),
    [
        ("scan.nii.gz", "nibabel", "reading NIfTI needs the package 'nibabel', which is not installed"),
        ("slice.dcm", "pydicom", "reading DICOM needs the package 'pydicom', which is not installed"),
        ("slice.png", "PIL", "reading PNG needs the package 'pillow', which is not installed"),
    ],
)
def test_a_reader_whose_package_is_missing_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, module: str, sentence: str
) -> None:
    image = tmp_path / name
    image.write_bytes(b"whatever it holds: no reader gets to it")
    monkeypatch.setitem(sys.modules, module, None)  # as if the package were not installed
    with pytest.raises(ReaderUnavailable, match=re.escape(sentence)):
        read_image_info(image)


def test_a_missing_package_refuses_the_manifest_rather_than_excluding_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "scan.nii").write_bytes(b"a NIfTI file, for all the site can tell")
    (tmp_path / "manifest.csv").write_text("image,patient_id\nscan.nii,p1\n")
    monkeypatch.setitem(sys.modules, "nibabel", None)
    assert image_kind(tmp_path / "scan.nii") == "nifti"  # its name says which reader, whatever is installed
    with pytest.raises(ReaderUnavailable, match="reading NIfTI needs the package 'nibabel', which is not installed"):
        check_manifest(tmp_path / "manifest.csv", skip_bad_files=True)  # not "image file unreadable"
