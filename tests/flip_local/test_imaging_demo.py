"""Behaviour tests for flip_local.imaging_demo, on the real BreastMNIST file (MedMNIST v2, CC BY 4.0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flip_core.paths import data_dir
from flip_local.errors import SitesError
from flip_local.imaging_demo import (
    IMAGING_SITES,
    MIN_PER_CLASS,
    SPLIT_SEED,
    describe_split,
    load_breastmnist,
    prepare_imaging_sites,
    public_holdout,
    public_pool,
    site_assignment,
    write_case_folder,
)

SPLIT_SIZES = {"train": 546, "val": 78, "test": 156}


@pytest.fixture(scope="module")
def source() -> Path:
    path = data_dir() / "breastmnist" / "BreastMNIST.npz"
    if not path.is_file():
        pytest.fail(f"the shared BreastMNIST file is missing at {path} (set FLIP_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def data(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return load_breastmnist(source)


@pytest.fixture(scope="module")
def pooled_labels(data) -> np.ndarray:
    return np.concatenate([data["train"][1], data["val"][1]])


@pytest.fixture(scope="module")
def root(tmp_path_factory, source: Path) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("imaging")
    return root, prepare_imaging_sites(root, source)


def _manifests(root: Path, manifests: dict[str, Path]) -> dict[str, pd.DataFrame]:
    return {site: pd.read_csv(path) for site, path in manifests.items()}


# ---- loading ----


def test_load_gives_the_official_splits_with_raveled_int64_labels(data) -> None:
    assert set(data) == set(SPLIT_SIZES)
    for split, size in SPLIT_SIZES.items():
        images, labels = data[split]
        assert images.shape == (size, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (size,) and labels.dtype == np.int64
        assert set(np.unique(labels)) == {0, 1}


def test_load_accepts_labels_stored_as_columns(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, size in (("train", 5), ("val", 3), ("test", 2)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (size, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (size, 1), dtype=np.uint8)  # as the official file has them
    path = tmp_path / "small.npz"
    np.savez(path, **arrays)
    data = load_breastmnist(path)
    for split in ("train", "val", "test"):
        images, labels = data[split]
        assert labels.shape == (len(images),) and labels.dtype == np.int64
        assert np.array_equal(labels, arrays[f"{split}_labels"][:, 0])
        assert np.array_equal(images, arrays[f"{split}_images"])


def test_load_finds_the_file_in_a_folder(source: Path, data) -> None:
    folder_data = load_breastmnist(source.parent)
    assert np.array_equal(folder_data["train"][0], data["train"][0])


def test_a_missing_file_is_a_sentence_naming_where_it_looked(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "BreastMNIST.npz"
    with pytest.raises(SitesError) as raised:
        load_breastmnist(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "FLIP_DATA_DIR" in message and "flip data fetch breastmnist" in message


def test_a_missing_file_stops_preparing_the_sites(tmp_path: Path) -> None:
    with pytest.raises(SitesError, match="nowhere"):
        prepare_imaging_sites(tmp_path, tmp_path / "nowhere.npz")
    assert not (tmp_path / "imaging").exists()


def test_a_file_without_the_splits_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, x=np.zeros(3))
    with pytest.raises(SitesError, match="train_images"):
        load_breastmnist(path)


# ---- the split ----


def test_assignment_is_deterministic_for_a_seed_and_differs_for_another(pooled_labels) -> None:
    first = site_assignment(pooled_labels)
    assert np.array_equal(first, site_assignment(pooled_labels, seed=SPLIT_SEED))
    assert not np.array_equal(first, site_assignment(pooled_labels, seed=SPLIT_SEED + 1))


def test_every_image_goes_to_one_site_and_each_site_has_enough_of_each_class(pooled_labels) -> None:
    for seed in (SPLIT_SEED, 1, 2, 3):
        assignment = site_assignment(pooled_labels, seed=seed)
        assert assignment.shape == pooled_labels.shape
        assert set(np.unique(assignment)) == set(range(len(IMAGING_SITES)))
        for site in range(len(IMAGING_SITES)):
            held = pooled_labels[assignment == site]
            assert np.sum(held == 0) >= MIN_PER_CLASS and np.sum(held == 1) >= MIN_PER_CLASS


def test_the_split_is_not_iid(pooled_labels) -> None:
    assignment = site_assignment(pooled_labels)
    sizes = np.bincount(assignment)
    shares = [np.mean(pooled_labels[assignment == site] == 0) for site in range(len(IMAGING_SITES))]
    assert len(set(sizes.tolist())) == len(IMAGING_SITES)  # no two sites the same size
    assert max(shares) - min(shares) > 0.05  # the sites' share of malignant differs by more than five points


def test_an_impossible_split_is_refused(pooled_labels) -> None:
    few = np.array([0] * (3 * MIN_PER_CLASS - 1) + [1] * 200)
    with pytest.raises(SitesError, match="too few"):
        site_assignment(few)
    with pytest.raises(SitesError, match="no draw"):
        site_assignment(pooled_labels, sites=3, alpha=0.01)  # nearly every draw gives one site a whole class


def test_describe_split_counts_each_site(pooled_labels) -> None:
    assignment = site_assignment(pooled_labels)
    table = describe_split(assignment, pooled_labels)
    assert list(table["site"]) == list(IMAGING_SITES)
    assert table["images"].sum() == len(pooled_labels)
    assert table["malignant"].sum() == np.sum(pooled_labels == 0)
    assert (table["malignant"] + table["benign_or_normal"] == table["images"]).all()
    first = pooled_labels[assignment == 0]
    assert table["share_malignant"][0] == pytest.approx(np.mean(first == 0))


# ---- the folders ----


def test_each_site_folder_holds_exactly_its_assigned_images(root, data, pooled_labels) -> None:
    base, manifests = root
    assert list(manifests) == list(IMAGING_SITES)
    assignment = site_assignment(pooled_labels)
    pooled_ids = [f"bm-train-{i:04d}" for i in range(546)] + [f"bm-val-{i:04d}" for i in range(78)]
    seen: list[str] = []
    for number, (site, table) in enumerate(_manifests(base, manifests).items()):
        assert manifests[site] == base / "imaging" / site / "manifest.csv"
        assert list(table.columns) == ["image", "label", "patient_id"]
        assert list(table["patient_id"]) == [pooled_ids[i] for i in np.flatnonzero(assignment == number)]
        assert list(table["image"]) == [f"images/{case}.png" for case in table["patient_id"]]
        seen += list(table["patient_id"])
    assert sorted(seen) == sorted(pooled_ids)  # every train and val image at exactly one site


def test_every_listed_image_is_a_lossless_copy_of_the_public_array(root, data) -> None:
    base, manifests = root
    for site, table in _manifests(base, manifests).items():
        for row in table.itertuples():
            path = base / "imaging" / site / row.image
            assert path.is_file()
            with Image.open(path) as png:
                assert png.format == "PNG" and png.mode == "L" and png.size == (28, 28)
                pixels = np.asarray(png)
            _, split, index = row.patient_id.split("-")
            images, labels = data[split]
            assert np.array_equal(pixels, images[int(index)])
            assert row.label == labels[int(index)]


def test_an_id_traces_back_to_its_place_in_the_public_file(root, data) -> None:
    base, manifests = root
    site = next(s for s, table in _manifests(base, manifests).items() if "bm-train-0012" in set(table["patient_id"]))
    with Image.open(base / "imaging" / site / "images" / "bm-train-0012.png") as png:
        assert np.array_equal(np.asarray(png), data["train"][0][12])


def test_no_official_test_image_is_at_any_site(root, data) -> None:
    base, manifests = root
    pool = {image.tobytes() for split in ("train", "val") for image in data[split][0]}
    # the public file itself holds one test image pixel for pixel as a train image (test 76 is train 115): only
    # the test images found nowhere else can show that no site received a test image
    test_only = {image.tobytes() for image in data["test"][0]} - pool
    assert len(test_only) >= 150
    for site, table in _manifests(base, manifests).items():
        assert not any(case.startswith("bm-test-") for case in table["patient_id"])
        for path in (base / "imaging" / site / "images").iterdir():
            with Image.open(path) as png:
                assert np.asarray(png).tobytes() not in test_only


def test_public_holdout_is_the_official_test_split(tmp_path: Path, source: Path, data) -> None:
    manifest = public_holdout(tmp_path, source)
    assert manifest == tmp_path / "imaging" / "public-test" / "manifest.csv"
    table = pd.read_csv(manifest)
    assert len(table) == 156
    assert list(table["patient_id"]) == [f"bm-test-{i:04d}" for i in range(156)]
    assert list(table["label"]) == list(data["test"][1])
    with Image.open(manifest.parent / table["image"][77]) as png:
        assert np.array_equal(np.asarray(png), data["test"][0][77])


def test_public_pool_holds_all_the_sites_images(tmp_path: Path, source: Path, root) -> None:
    table = pd.read_csv(public_pool(tmp_path, source))
    base, manifests = root
    at_sites = pd.concat(_manifests(base, manifests).values())
    assert len(table) == 624
    assert sorted(table["patient_id"]) == sorted(at_sites["patient_id"])


def test_writing_a_case_folder_again_replaces_it(tmp_path: Path) -> None:
    folder = tmp_path / "cases"
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_case_folder(folder, images, np.array([0, 1]), ["a", "b"])
    manifest = write_case_folder(folder, images[:1], np.array([1]), ["c"])
    assert sorted(p.name for p in (folder / "images").iterdir()) == ["c.png"]
    assert pd.read_csv(manifest).to_dict("records") == [{"image": "images/c.png", "label": 1, "patient_id": "c"}]


def test_a_case_folder_refuses_mismatched_or_unsafe_cases(tmp_path: Path) -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(SitesError, match="one of each"):
        write_case_folder(tmp_path / "x", images, np.array([0]), ["a", "b"])
    with pytest.raises(SitesError, match="repeat"):
        write_case_folder(tmp_path / "x", images, np.array([0, 1]), ["a", "a"])
    with pytest.raises(SitesError, match="cannot name a file"):
        write_case_folder(tmp_path / "x", images, np.array([0, 1]), ["a", "../b"])
