"""The dataset formats a site knows, by name (``site_agent.data.formats``): an unknown name refused with the known
ones, a name registered once, each format's own options, what a run's task process is handed (its rows only, and
the files its cell reads by path: its own cases'), ``--format``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from site_agent.cli import main
from site_agent.data.catalog import CatalogError, DatasetEntry, SiteConfig, init_site
from site_agent.data.formats import FORMATS, add_dataset, handed, load_split, load_table, task_data
from site_agent.data.image_datasets import add_image_dataset
from site_agent.data.registry import Registry
from site_agent.data.tables import CSV


def write_table(path: Path) -> Path:
    path.write_text("age,sex\n61,1\n45,0\n70,1\n52,0\n")
    return path


def test_the_formats_are_registered_by_name_in_their_order() -> None:
    assert FORMATS.names() == ("csv", "uci-heart", "images", "omop")


def test_an_unknown_format_is_refused_naming_the_known_ones(tmp_path: Path) -> None:
    site = init_site(tmp_path / "site", "A")
    known = re.escape("unknown dataset format 'parquet': the known ones are csv, uci-heart, images, omop")
    with pytest.raises(CatalogError, match=known):
        add_dataset(site, "table", write_table(tmp_path / "t.csv"), "parquet")
    assert not (tmp_path / "site" / "splits" / "table.json").exists()  # refused before anything is written


def test_a_dataset_recorded_with_an_unknown_format_is_refused_when_read(tmp_path: Path) -> None:
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", write_table(tmp_path / "t.csv"), "csv")
    entry = site.datasets["table"]
    odd = SiteConfig(site.root, site.name, {"table": DatasetEntry(**{**entry.__dict__, "format": "parquet"})})
    reads = (lambda: load_table(odd, "table"), lambda: load_split(odd, "table"), lambda: handed(odd, "table"))
    for read in reads:  # a run's task process is handed nothing of it: the agent refuses it, naming the format
        with pytest.raises(CatalogError, match="unknown dataset format 'parquet': the known ones are csv"):
            read()


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


def test_a_table_is_handed_to_the_task_as_its_split_rows_and_binds_nothing(tmp_path: Path) -> None:
    table = write_table(tmp_path / "t.csv")
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", table, "csv", train_fraction=0.5, stratify="sex")
    given = handed(site, "table")
    assert given.files == ()  # nothing of the site bound into its sandbox
    assert str(table.resolve()).encode() not in given.payload  # nor the table's path
    train, test = task_data(site, "table", given.payload)
    assert len(train) == len(test) == 2 and sorted(train["sex"]) == [0, 1]  # stratified on sex
    assert sorted([*train["age"], *test["age"]]) == [45, 52, 61, 70]


def test_a_cohorts_task_is_handed_its_rows_alone_split_as_the_dataset_was(tmp_path: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("age,marker\n" + "".join(f"{40 + i},{7000 + i}\n" for i in range(20)))
    site = add_dataset(init_site(tmp_path / "site", "A"), "table", table, "csv", train_fraction=0.75)
    rows = [1, 3, 5, 7, 9, 11, 13, 15]
    given = handed(site, "table", rows)
    train, test = task_data(site, "table", given.payload)
    assert sorted([*train["marker"], *test["marker"]]) == [7000 + i for i in rows]  # those rows, no other
    assert (len(train), len(test)) == (6, 2)  # its own split, by the dataset's fraction
    again = load_split(site, "table", rows)  # in one process: the same parts, to the bit
    assert train.equals(again[0]) and test.equals(again[1])


def test_an_imaging_runs_task_is_handed_its_cases_and_binds_their_images_only(tmp_path: Path) -> None:
    import numpy as np

    folder = tmp_path / "data"
    folder.mkdir()
    names = [f"c{i}" for i in range(6)]
    for name in names:
        np.savez(folder / f"{name}.npz", image=np.arange(16, dtype=np.float32).reshape(4, 4))
    (folder / "manifest.csv").write_text("image,patient_id\n" + "".join(f"{n}.npz,p{n}\n" for n in names))
    site = add_image_dataset(init_site(tmp_path / "site", "A"), "scans", folder / "manifest.csv")
    whole = handed(site, "scans")
    assert whole.files == tuple((folder / f"{n}.npz").resolve() for n in names)  # every case of the split
    assert str(folder / "manifest.csv").encode() not in whole.payload  # the index's cases, never the manifest
    cohort = handed(site, "scans", [1, 4])
    assert cohort.files == ((folder / "c1.npz").resolve(), (folder / "c4.npz").resolve())  # its cases' files alone
    assert b"c0.npz" not in cohort.payload and b"pc2" not in cohort.payload
    train, test = task_data(site, "scans", cohort.payload)
    assert sorted(c["patient_id"] for c in train + test) == ["pc1", "pc4"]
    again = add_dataset(site, "again", folder / "manifest.csv", "images", split_seed=1)  # the same, by its name
    assert (again.datasets["again"].format, again.datasets["again"].rows) == ("images", 6)


def test_flip_site_offers_the_registered_formats(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["dataset", "add", str(tmp_path), "table", str(tmp_path / "t.csv"), "--format", "parquet"])
    assert refused.value.code == 2
    said = capsys.readouterr().err
    assert "invalid choice: 'parquet'" in said and all(repr(name) in said for name in FORMATS.names())
