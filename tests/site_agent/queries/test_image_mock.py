"""A site's mock of an imaging dataset (site_agent.queries.image_mock): the forms its images may take, each shared by
at least the threshold's cases, and a table mock whose cases take them; nothing of a real case, file or path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flip_core.query import QueryKind, QueryRequest, encode_query, encode_reply
from flip_core.status import StepStatus
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.image_datasets import SHAPE_COLUMNS, SPACING_COLUMNS, add_image_dataset, as_table
from site_agent.governance.audit import read_records
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortStore
from site_agent.queries.image_mock import MAX_CASES, MIN_CASES, image_forms, make_image_mock
from site_agent.queries.mock import MockRefused
from site_agent.queries.service import QueryService

T = 10


def case(
    number: int, shape: tuple[int, ...], spacing: tuple[float, ...] | None = (0.7031, 0.7031, 2.5)
) -> dict[str, Any]:
    return {
        "image": f"/hospital/scans/{number}.nii.gz",
        "label": number % 2,
        "patient_id": f"P{number:04d}",
        "clinical": {"age": 40 + number % 30},
        "image_info": {
            "path": f"/hospital/scans/{number}.nii.gz",
            "kind": "nifti",
            "shape": list(shape),
            "spacing": None if spacing is None else list(spacing),
            "orientation": "RAS",
            "dtype": "int16",
            "fingerprint": f"sha256:{number:064x}",
            "files": 1,
            "warning": None,
            "intensity": {"mean": 100.0 + number, "std": 20.0, "p1": -5.0 + number % 7, "p99": 300.0 + number % 11},
        },
    }


def index_of(cases: list[dict[str, Any]], mask: bool = False) -> dict[str, Any]:
    return {
        "dataset": "scans",
        "label_column": None if mask else "label",
        "mask_column": "mask" if mask else None,
        "columns": ["age"],
        "cases": cases,
    }


def mixed() -> dict[str, Any]:
    """25 cases of one shape, 10 whose slice counts differ (45..54: rounded, 48) and 4 large ones of their own."""
    cases = [case(i, (64, 64, 40)) for i in range(25)]
    cases += [case(25 + i, (64, 64, 45 + i), (0.5 + 0.1 * i, 0.5, 3.0)) for i in range(10)]
    cases += [case(35 + i, (100, 100, 100)) for i in range(4)]
    return index_of(cases)


def mock_of(index: dict[str, Any], seed: int = 3) -> tuple[Any, dict[str, Any]]:
    return make_image_mock(index, as_table(index), T, seed)


def test_only_shapes_that_the_threshold_of_cases_share_become_forms() -> None:
    forms = image_forms(mixed(), T)
    assert [(f.kind, f.dtype, f.shape) for f in forms] == [
        ("nifti", "int16", (64, 64, 40)),
        ("nifti", "int16", (64, 64, 48)),
    ]
    assert [f.share for f in forms] == pytest.approx([0.64 / 0.9, 0.26 / 0.9])  # 25/39 and 10/39 to 2 figures
    mock, images = mock_of(mixed())
    shapes = {tuple(int(v) for v in row) for row in mock[list(SHAPE_COLUMNS)].to_numpy()}
    assert shapes <= {(64, 64, 40), (64, 64, 48)} and (100, 100, 100) not in shapes  # 4 cases: never shown


def test_a_spacing_is_released_only_where_the_threshold_of_a_forms_cases_share_it() -> None:
    common, rounded = image_forms(mixed(), T)
    assert common.spacing == (0.7, 0.7, 2.5)  # 25 cases share it, to two significant figures
    assert rounded.spacing is None  # ten cases, ten spacings
    mock, images = mock_of(mixed())
    for row, chosen in zip(mock[list(SPACING_COLUMNS)].to_numpy(), images["form"], strict=True):
        spacing = images["forms"][chosen]["spacing"]
        assert (row.tolist() == spacing) if spacing else np.isnan(row).all()


def test_each_mock_case_takes_its_forms_shape_and_nothing_of_a_real_case_leaves() -> None:
    index = mixed()
    mock, images = mock_of(index)
    for row, chosen in zip(mock[list(SHAPE_COLUMNS)].to_numpy(), images["form"], strict=True):
        assert row.tolist() == images["forms"][chosen]["shape"]
    assert images["keys"] == ["label", "patient_id", "age"] and images["mask"] is False
    assert list(mock.patient_id) == [f"mock-{i:03d}" for i in range(1, len(mock) + 1)]
    released = json.dumps([mock.astype(object).where(mock.notna(), None).to_numpy().tolist(), images])
    for secret in ("/hospital", "sha256", "P00", "RAS", ".nii"):
        assert secret not in released


def test_a_site_sends_at_most_64_mock_cases_and_fewer_of_large_images() -> None:
    small = index_of([case(i, (28, 28), None) for i in range(300)])
    assert len(mock_of(small)[0]) == MAX_CASES
    large = index_of([case(i, (512, 512, 200)) for i in range(300)])
    assert len(mock_of(large)[0]) == MIN_CASES  # 52 million voxels each


def test_images_whose_forms_are_all_rarer_than_the_threshold_are_refused_a_mock_in_a_sentence() -> None:
    rare = index_of([case(i, (100 + 40 * i, 80)) for i in range(12)])
    with pytest.raises(MockRefused, match="no image kind, dtype and shape is shared by at least 10 cases"):
        mock_of(rare)


def test_the_same_seed_gives_the_same_mock_and_a_mask_dataset_says_so() -> None:
    first, again = mock_of(mixed(), 5), mock_of(mixed(), 5)
    assert first[0].equals(again[0]) and first[1] == again[1]
    masked = index_of([case(i, (32, 32, 8)) for i in range(20)], mask=True)
    mock, images = mock_of(masked)
    assert images["mask"] is True and "label" not in images["keys"] and "label" not in mock.columns


def test_the_query_service_sends_an_imaging_mock_and_audits_the_forms_it_released(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["image,label,patient_id"]
    for i in range(24):
        shape = (6, 5) if i < 20 else (9, 9)  # four of another shape: under the threshold
        np.savez(folder / f"c{i}.npz", image=np.full(shape, i, dtype=np.float32))
        rows.append(f"c{i}.npz,{i % 2},p{i}")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    site = add_image_dataset(init_site(tmp_path / "site", "A"), "scans", folder / "manifest.csv")
    write_policy(
        site, {"projects": {"p": {"approved": True, "researchers": ["r"], "datasets": ["*"], "tasks": ["query"]}}}
    )
    service = QueryService(site, Governance(site), CohortStore(site.root))
    request = QueryRequest("q1", "p", "r", "scans", QueryKind.MOCK)
    reply = service.reply(request)
    assert reply.status == StepStatus.OK, reply.reason
    images = reply.table["images"]
    assert [form["shape"] for form in images["forms"]] == [[6, 5]] and images["forms"][0]["kind"] == "npz"
    assert len(reply.table["rows"]) == len(images["form"]) == 20  # 24 cases, rounded to ten
    assert str(folder).encode() not in encode_reply(reply)
    service.answer(encode_query(request))  # as the fleet hands it over: audited
    audited = [r for r in read_records(site.root) if r["kind"] == "query"][-1]
    assert audited["released"]["image_forms"] == images["forms"] and audited["released"]["mock_rows"] == 20
