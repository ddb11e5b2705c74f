"""The dataset formats a site knows, by name (``site_agent.data.formats``): an unknown name refused with the known
ones, a name registered once, each format's own options, the files a task process is handed, ``--format``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from site_agent.cli import main
from site_agent.data.catalog import CatalogError, DatasetEntry, SiteConfig, init_site, split_path
from site_agent.data.formats import FORMATS, add_dataset, bound_files, handed_files, load_split, load_table
from site_agent.data.image_datasets import add_image_dataset
from site_agent.data.registry import Registry
from site_agent.data.tables import CSV


def write_table(path: Path) -> Path:
    path.write_text("age,sex\n61,1\n45,0\n70,1\n52,0\n")
    return path


def test_the_formats_are_registered_by_name_in_their_order() -> None:
    assert FORMATS.names() == ("csv", "uci-heart", "images")


def test_an_unknown_format_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site", "A")
    known = re.escape("unknown dataset format 'parquet': the known ones are csv, uci-heart, images")
    with pytest.raises(CatalogError, match=known):
        add_dataset(site, "table", write_table(tmp_path / "t.csv"), "parquet")
    assert not (tmp_path / "site" / "splits" / "table.json").exists()  # refused before anything is written


def test_a_dataset_recorded_with_an_unknown_format_is_refused_when_read(tmp_path: Path) -> None:
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", write_table(tmp_path / "t.csv"), "csv")
    entry = site.datasets["table"]
    odd = SiteConfig(site.root, site.name, {"table": DatasetEntry(**{**entry.__dict__, "format": "parquet"})})
    for read in (lambda: load_table(odd, "table"), lambda: load_split(odd, "table")):
        with pytest.raises(CatalogError, match="unknown dataset format 'parquet': the known ones are csv"):
            read()


def test_a_dataset_of_an_unknown_format_hands_the_task_no_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", write_table(tmp_path / "t.csv"), "csv")
    entry = site.datasets["table"]
    odd = SiteConfig(site.root, site.name, {"table": DatasetEntry(**{**entry.__dict__, "format": "parquet"})})
    assert handed_files(odd) == [] and bound_files(odd) == []
    assert "dataset 'table' has the unknown format 'parquet'" in capsys.readouterr().err


def test_a_format_name_is_registered_once() -> None:
    with pytest.raises(CatalogError, match="dataset format 'csv' is registered already"):
        FORMATS.register("csv", CSV)
    assert FORMATS.get("csv") is CSV
    fresh: Registry[str] = Registry("thing", CatalogError)
    fresh.register("one", "first")
    with pytest.raises(CatalogError, match="thing 'one' is registered already"):
        fresh.register("one", "second")
    assert fresh.get("one") == "first" and fresh.names() == ("one",)


def test_a_format_refuses_an_option_that_is_not_its_own(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site", "A")
    with pytest.raises(CatalogError, match="dataset format 'csv' takes no option 'image_column'"):
        add_dataset(site, "table", write_table(tmp_path / "t.csv"), "csv", image_column="scan")


def test_a_table_is_handed_to_the_task_with_its_split_and_binds_nothing(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv")
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", table, "csv", train_fraction=0.5, stratify="sex")
    assert handed_files(site) == [table.resolve(), split_path(site.root, "table")]
    assert bound_files(site) == []
    train, test = load_split(site, "table")
    assert len(train) == len(test) == 2 and sorted(train["sex"]) == [0, 1]  # stratified on sex


def test_an_imaging_datasets_images_are_bound_and_its_index_handed(tmp_path: Path) -> None:
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        np.savez(folder / f"{name}.npz", image=np.arange(16, dtype=np.float32).reshape(4, 4))
    (folder / "manifest.csv").write_text("image,patient_id\na.npz,p1\nb.npz,p2\n")
    site = add_image_dataset(init_site(tmp_path / "site", "A"), "scans", folder / "manifest.csv")
    entry = site.datasets["scans"]
    assert handed_files(site) == [Path(entry.path), split_path(site.root, "scans")]  # the index, never the manifest
    assert bound_files(site) == [(folder / "a.npz").resolve(), (folder / "b.npz").resolve()]
    again = add_dataset(site, "again", folder / "manifest.csv", "images", split_seed=1)  # the same, by its name
    assert (again.datasets["again"].format, again.datasets["again"].rows) == ("images", 2)
    assert bound_files(again) == bound_files(site)  # each image bound once, whichever datasets name it


def test_flip_site_offers_the_registered_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["dataset", "add", str(tmp_path), "table", str(tmp_path / "t.csv"), "--format", "parquet"])
    assert refused.value.code == 2
    said = capsys.readouterr().err
    assert "invalid choice: 'parquet'" in said and all(repr(name) in said for name in FORMATS.names())
