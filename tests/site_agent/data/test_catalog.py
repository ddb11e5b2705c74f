from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from site_agent.data.catalog import CatalogError, init_site, load_site, seeded_split
from site_agent.data.formats import add_dataset, load_split


def test_add_dataset_records_schema_rows_fingerprint_and_split(tmp_path: Path, heart_dir: Path) -> None:
    site = init_site(tmp_path / "site", "Cleveland")
    site = add_dataset(
        site, "heart-disease", heart_dir / "processed.cleveland.data", "uci-heart", train_fraction=0.66, split_seed=43
    )
    entry = load_site(tmp_path / "site").dataset("heart-disease")
    assert entry.rows == 303
    assert entry.columns[0] == "age" and entry.columns[-1] == "num"
    assert entry.train_rows + entry.test_rows == 303
    assert entry.train_rows == pytest.approx(0.66 * 303, abs=2)
    assert entry.fingerprint == "sha256:a74b7efa387bc9d108d7d0115d831fe9b414b29ae7124f331b622b4efa0427c8"
    train, test = load_split(load_site(tmp_path / "site"), "heart-disease")
    assert len(train) == entry.train_rows and len(test) == entry.test_rows


def test_split_is_seeded_and_stratified() -> None:
    import pandas as pd

    labels = pd.Series([0] * 80 + [1] * 20)
    first = seeded_split(labels, 100, 0.75, 7)
    assert first == seeded_split(labels, 100, 0.75, 7)
    assert first != seeded_split(labels, 100, 0.75, 8)
    train, test = first
    assert sorted(train + test) == list(range(100))
    assert sum(labels[i] for i in test) == 5  # a quarter of each class


def test_changed_file_is_refused(tmp_path: Path, heart_dir: Path) -> None:
    copy = tmp_path / "va.data"
    shutil.copy(heart_dir / "processed.va.data", copy)
    site = add_dataset(init_site(tmp_path / "site", "VA"), "heart", copy, "uci-heart")
    copy.write_text(copy.read_text() + "63,1,4,140,260,0,1,112,1,3,2,?,?,2\n")
    with pytest.raises(CatalogError, match="changed since it was registered"):
        load_split(site, "heart")


def test_unknown_dataset_names_the_ones_held(tmp_path: Path, heart_dir: Path) -> None:
    site = add_dataset(init_site(tmp_path / "s", "VA"), "heart", heart_dir / "processed.va.data", "uci-heart")
    with pytest.raises(CatalogError, match=r"no dataset 'lungs' \(it has: heart\)"):
        site.dataset("lungs")


@pytest.mark.parametrize("name", ["", "a b", "../x", "-lead"])
def test_bad_site_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CatalogError, match="not allowed"):
        init_site(tmp_path / "s", name)


def test_init_refuses_an_existing_site(tmp_path: Path) -> None:
    init_site(tmp_path / "s", "A")
    with pytest.raises(CatalogError, match="already"):
        init_site(tmp_path / "s", "A")
