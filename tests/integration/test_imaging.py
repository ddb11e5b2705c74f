"""Imaging at the sites, in a real local federation (``flip up --demo imaging``).

Three sites hold their share of BreastMNIST (PNG files under a manifest, registered as the imaging
dataset ``breastmnist``); the first also registers ``scans``: real DICOM (pydicom's CT and MR samples
and a shipped five-slice series) and NIfTI (nibabel's test volumes) beside a clinical column. Cells
read them through MONAI, in their sandbox, as a MONAI user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from flip_core.errors import Rejected, RunFailed
from flip_core.util import wait_until
from flip_local.federation import Federation, restart
from flip_magics.client import FlipClient

from helpers import EVAL_LINE, flip_run, image_cell, local_federation, static_figures

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
FIRST = "Ultrasound-A"


def scans_folder(folder: Path) -> Path:
    """Copies of pydicom's and nibabel's shipped samples, five each (distinct patients), and a manifest with a
    label and an age per case: enough cases that the site's threshold lets their metrics leave."""
    import nibabel
    import pydicom

    dicom = Path(os.path.dirname(pydicom.data.__file__)) / "test_files"
    nifti = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data"
    samples = [dicom / "CT_small.dcm", dicom / "MR_small.dcm", nifti / "anatomical.nii", nifti / "standard.nii.gz"]
    folder.mkdir(parents=True)
    rows, case = ["image,label,patient_id,age"], 0
    for copy in range(5):
        for sample in samples:
            shutil.copy(sample, folder / f"{copy}_{sample.name}")
            rows.append(f"{copy}_{sample.name},{case % 2},p{case},{40 + case}")
            case += 1
        shutil.copytree(dicom / "dicomdirtests" / "98892001" / "CT5N", folder / f"series{copy}")
        rows.append(f"series{copy},{case % 2},p{case},{40 + case}")
        case += 1
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


@pytest.fixture(scope="module")
def imaging(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-imaging")
    with local_federation(home, demo="imaging") as connection:
        root = Federation(home).root
        site_dir = root / "sites" / FIRST
        manifest = scans_folder(tmp_path_factory.mktemp("scans") / "scans")
        subprocess.run(
            [BIN / "flip-site", "dataset", "add", site_dir, "scans", manifest, "--format", "images"]
            + ["--train-fraction", "0.5"],
            check=True,
            capture_output=True,
        )
        # beside the registered images, a file that is not one of them: no cell may see it
        images = Path(json.loads((site_dir / "images" / "breastmnist.json").read_text())["cases"][0]["image"]).parent
        (images / "stray.png").write_bytes((images.parent / "manifest.csv").read_bytes())
        restart(f"site-{FIRST}", home)  # the agent reads its catalog when it starts
        client = FlipClient(connection["coordinator_url"], connection["token"], timeout=120)
        wait_for_dataset(client, FIRST, "scans")  # back, with its new dataset
        yield {**connection, "home": home, "root": root, "site_dir": site_dir, "client": client}


def _site(client: FlipClient, name: str) -> dict[str, Any]:
    return next(s for s in client.sites() if s["site"] == name)


def wait_for_dataset(client: FlipClient, site: str, dataset: str, seconds: float = 60) -> None:
    def announced() -> bool:
        entry = _site(client, site)
        return entry["status"] == "online" and any(d["name"] == dataset for d in entry["datasets"])

    assert wait_until(announced, seconds, 0.1), f"{site} did not announce {dataset!r} within {seconds} s"


SCANS_CELL = """
import numpy as np
import torch
from monai.transforms import LoadImage

load = LoadImage(image_only=True)  # MONAI picks its reader by the file (NIfTI, DICOM file or series folder)

def build_model():
    return torch.nn.Linear(2, 1)

def features(cases):
    rows = []
    voxels = 0
    for case in cases:
        image = load(case["image"])  # the image and a clinical column of the same case: multimodal
        voxels += int(np.prod(image.shape))
        rows.append([float(torch.as_tensor(image).float().mean()) / 1000.0, case["age"] / 100.0])
    return torch.tensor(rows, dtype=torch.float32), voxels

def train(model, data, config):
    X, voxels = features(data.train)
    y = torch.tensor([float(c["label"]) for c in data.train])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X).squeeze(1), y)
    opt.zero_grad(); loss.backward(); opt.step()
    return {"loss": loss.item(), "cases_read": len(data.train), "voxels": voxels,
            "age_sum": sum(c["age"] for c in data.train), "device_is_site_choice": config["device"] == data.device}

def evaluate(model, data, config):
    X, _ = features(data.test)
    return {"cases": len(data.test)}
"""


def test_dicom_and_nifti_come_back_through_a_task_with_their_clinical_column(imaging) -> None:
    client: FlipClient = imaging["client"]
    wait_for_dataset(client, FIRST, "scans")
    run = client.train(SCANS_CELL, dataset="scans", rounds=1, seed=0)
    run.wait(180)
    assert run.status == "completed", run.reason
    index = json.loads((imaging["site_dir"] / "images" / "scans.json").read_text())
    split = json.loads((imaging["site_dir"] / "splits" / "scans.json").read_text())
    train = [index["cases"][i] for i in split["train"]]
    metrics = {
        e["metrics"].get("voxels"): e["metrics"]
        for e in run.events
        if e["type"] == "metrics" and e["site"] == FIRST and e["phase"] == "train"
    }
    expected = sum(_size(case["image_info"]["shape"]) for case in train)
    assert expected in metrics, (expected, metrics)  # every train image decoded, exactly as registered
    got = metrics[expected]
    assert got["cases_read"] == len(train) and got["age_sum"] == sum(c["clinical"]["age"] for c in train)
    assert got["device_is_site_choice"] == 1.0
    kinds = {case["image_info"]["kind"] for case in train}
    assert {"dicom", "nifti"} <= kinds or {"dicom-series", "nifti"} <= kinds, kinds
    done = [e for e in run.events if e["type"] == "site" and e.get("status") == "done"]
    assert done and all(e["device"] == "cpu" for e in done)  # each round's row says where the step ran
    steps = run.steps  # and the run keeps every site's every step
    assert set(steps.device) == {"cpu"} and sorted(set(steps["round"])) == [0, 1]
    assert steps.gpu_peak_bytes.isna().all()  # no GPU here: nothing claimed


def _size(shape: list[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def test_the_sites_show_their_device_and_each_datasets_inclusion_report(imaging) -> None:
    client: FlipClient = imaging["client"]
    wait_for_dataset(client, FIRST, "scans")
    table = client.site_table()
    assert set(table.site) == {"Ultrasound-A", "Ultrasound-B", "Ultrasound-C"}
    assert set(table.device) == {"cpu"}  # `--device auto` on a host without a GPU
    report = client.inclusion()
    breast = report[report.dataset == "breastmnist"].set_index("site")
    assert breast["included"].sum() == 624  # the public train+val images, every one usable
    scans = report[(report.dataset == "scans")].iloc[0]
    assert scans["cases"] == 25 and scans["included"] == 25
    record = client.run(client.runs()[0]["run_id"])
    assert "inclusion" in json.dumps(record["record"]["site_datasets"])  # the run record keeps each site's report


def test_a_changed_image_is_refused_by_name(imaging, tmp_path: Path) -> None:
    """The registered record is what training sees: a file changed afterwards stops the run at that site."""
    client: FlipClient = imaging["client"]
    index = json.loads((imaging["site_dir"] / "images" / "scans.json").read_text())
    victim = Path(index["cases"][0]["image"])
    original = victim.read_bytes()
    try:
        changed = bytearray(original)
        changed[len(changed) // 2] ^= 0xFF  # one byte of one image
        victim.write_bytes(bytes(changed))
        run = client.train(SCANS_CELL, dataset="scans", rounds=1, seed=0)
        with pytest.raises(RunFailed):
            run.wait(180)
        assert f"{FIRST}: DatasetChanged" in run.reason and "changed since it was registered" in run.reason, run.reason
        log = (imaging["site_dir"] / "logs" / f"run-{run.run_id}.log").read_text()
        assert f"{victim} changed since it was registered" in log  # the site's admin reads which file
    finally:
        victim.write_bytes(original)


CACHE_CELL = """
import os
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd, Transform

READS = {"n": 0}

class Counted(Transform):
    def __call__(self, case):
        READS["n"] += 1
        return case

transform = Compose(
    [Counted(), LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), ScaleIntensityd(keys="image")]
)

def build_model():
    return torch.nn.Linear(28 * 28, 1)

def train(model, data, config):
    before = READS["n"]
    dataset = data.cached("train", transform)
    images = torch.stack([torch.as_tensor(item["image"]).reshape(-1) for item in dataset])
    labels = torch.tensor([float(c["label"]) for c in data.train])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).squeeze(1), labels)
    opt.zero_grad(); loss.backward(); opt.step()
    folder = os.path.dirname(data.train[0]["image"])
    return {"loss": loss.item(), "files_read": READS["n"] - before,
            "stray_visible": float(os.path.exists(os.path.join(folder, "stray.png"))),
            "manifest_visible": float(os.path.exists(os.path.join(os.path.dirname(folder), "manifest.csv"))),
            "registered_visible": float(os.path.exists(data.train[0]["image"]))}

def evaluate(model, data, config):
    return {"cases": len(data.test)}
"""


def test_round_two_reads_no_file_and_the_sandbox_holds_only_the_registered_images(imaging) -> None:
    client: FlipClient = imaging["client"]
    wait_for_dataset(client, FIRST, "scans")
    run = client.train(CACHE_CELL, dataset="breastmnist", rounds=2, seed=0)
    run.wait(240)
    assert run.status == "completed", run.reason
    train = [e for e in run.events if e["type"] == "metrics" and e["site"] != "global" and e["phase"] == "train"]
    by_round = {(e["site"], e["round"]): e["metrics"] for e in train}
    assert len(by_round) == 6
    for site in ("Ultrasound-A", "Ultrasound-B", "Ultrasound-C"):
        first, second = by_round[(site, 1)], by_round[(site, 2)]
        assert first["files_read"] > 0 and second["files_read"] == 0  # decoded once, cached by the warm process
        assert first["registered_visible"] == 1.0
        assert first["manifest_visible"] == 0.0 and first["stray_visible"] == 0.0


def test_the_breastmnist_notebook_runs_headless_under_flip_run(imaging, tmp_path: Path) -> None:
    execution = flip_run("02_imaging_breastmnist.ipynb", tmp_path, rounds=3, central_epochs=3)
    out = tmp_path / "02_imaging_breastmnist.ipynb"
    assert len(execution["runs"]) == 1 and static_figures(out), "the executed notebook shows its run"
    record = json.loads((tmp_path / "records" / f"{execution['runs'][0]}.json").read_text())
    assert record["notebook"]["parameters"] == {"rounds": 3, "central_epochs": 3}
    assert "monai" in record["site_packages"]["Ultrasound-A"]["packages"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["site_auc"]) == {"Ultrasound-A", "Ultrasound-B", "Ultrasound-C"}
    assert 0.5 < summary["federated"]["holdout_auc"] <= 1.0
    assert 0.5 < summary["central"]["holdout_auc"] <= 1.0
    executed = nbformat.read(out, as_version=4)
    assert "widgets" in executed.metadata


def test_image_sizes_spacings_and_label_counts_are_queried_like_any_column(imaging) -> None:
    """The query path sees an imaging dataset as its cases' table: label, clinical columns, and each image's
    dimensions and spacing as registration measured them (never a path), under the same disclosure rules."""
    client: FlipClient = imaging["client"]
    labels = client.query("breastmnist", "count", ["label"])
    pooled = labels.pooled.set_index("label")
    most = pooled["noise"]  # each site moves its released counts by at most its noise (2 by default): their sum
    assert abs(int(pooled.loc["0", "count"]) - 168) <= most["0"]  # malignant: train+val 147+21
    assert abs(int(pooled.loc["1", "count"]) - 456) <= most["1"] and most["1"] > 0
    sizes = client.query("breastmnist", "stats", ["image_dim_0", "image_dim_1"])
    assert set(sizes.pooled["mean"].round(6)) == {28.0}
    # each case's mean intensity (8-bit ultrasound), as registration measured it: a histogram over the cases
    intensity = client.query("breastmnist", "hist", ["intensity_mean"], bins=4, range=(0, 256))
    assert abs(intensity.totals["pooled"] - 624) <= intensity.raw["pooled"]["total_noise"]
    wait_for_dataset(client, FIRST, "scans")
    spacing = client.query("scans", "stats", ["spacing_0", "age"], sites=[FIRST])
    assert abs(spacing.sites.set_index("column").loc["age", "n"] - 25) <= 2
    index = json.loads((imaging["site_dir"] / "images" / "scans.json").read_text())
    answer = json.dumps(spacing.raw)
    assert not any(case["image"] in answer for case in index["cases"])  # what left holds no file's path


def test_a_cell_sized_for_other_images_fails_on_the_mock_in_the_kernel_before_anything_is_submitted(imaging) -> None:
    """Each site's imaging mock is written here as image files of its registered form (28 x 28 grey PNGs): a linear
    layer sized for 128 features, where the images flatten to 784, fails in this kernel with torch's own sentence and
    the cell's line, and the coordinator never hears of it."""
    client: FlipClient = imaging["client"]
    before = {r["run_id"] for r in client.runs()}
    source = image_cell(128)
    run = client.train(source, dataset="breastmnist", mock=True, name="wrong-size")
    with pytest.raises(RunFailed):
        run.wait(120)
    line = source.splitlines().index(EVAL_LINE) + 1
    assert run.reason.startswith(f"MOCK run failed: RuntimeError at cell line {line} in evaluate() on the MOCK of ")
    assert "mat1 and mat2 shapes cannot be multiplied (" in run.traceback and "x784 and 128x1)" in run.traceback
    assert {r["run_id"] for r in client.runs()} == before  # nothing was submitted


def test_a_correct_imaging_cell_runs_to_completion_on_the_sites_mocks(imaging) -> None:
    client: FlipClient = imaging["client"]
    mocks = client.mock("breastmnist")
    assert set(mocks) == {"Ultrasound-A", "Ultrasound-B", "Ultrasound-C"}
    for site, frame in mocks.items():
        assert 10 <= len(frame) <= 64 and set(frame.label.dropna()) <= {0, 1}
        assert mocks.images[site]["forms"] == [
            {"kind": "png", "dtype": "uint8", "shape": [28, 28], "spacing": None, "share": 1.0}
        ]
        assert not frame.patient_id.str.startswith("bm-").any()  # no case of the site's
    run = client.train(image_cell(28 * 28), dataset="breastmnist", rounds=2, mock=True, name="dry")
    run.wait(120)
    assert run.status == "completed" and run.record.mock
    pixels = run.history[(run.history.metric == "pixels") & (run.history.site != "global")]
    assert set(pixels.value) == {784.0} and len(pixels) == 6  # three sites, two rounds


def test_a_failure_at_the_sites_is_re_run_on_a_sites_mock_and_its_traceback_shown_as_the_mocks(imaging) -> None:
    client: FlipClient = imaging["client"]
    source = image_cell(128)
    run = client.train(source, dataset="breastmnist", rounds=1, name="wrong-size-at-the-sites")
    with pytest.raises(RunFailed):
        run.wait(180)
    line = source.splitlines().index(EVAL_LINE) + 1
    assert f"RuntimeError at cell line {line} in evaluate()" in run.reason
    explanation = client.explain_failure(run)
    assert explanation is not None and explanation.same, explanation
    site = explanation.site
    assert explanation.text.startswith(
        f"This is the traceback of the same failure on {site}'s MOCK data, in this kernel"
    )
    assert f"%flip_request traceback {run.run_id} --site {site}" in explanation.text
    assert "mat1 and mat2 shapes cannot be multiplied" in explanation.traceback
    assert EVAL_LINE.strip() in explanation.traceback


def test_a_histogram_of_the_images_voxels_is_pooled_over_the_sites(imaging) -> None:
    client: FlipClient = imaging["client"]
    voxels = client.query("breastmnist", "hist", ["intensity"], bins=4, range=(0, 256))
    cells = voxels.pooled.set_index("intensity")["count"]
    inside = [label for label in cells.index if label.startswith("[")]
    assert len(inside) == 4 and cells[inside].notna().sum() >= 3
    # every 8-bit pixel lies in range: the empty below/above cells are withheld (a true zero looks like a small
    # count), and with them the bin behind the fewest cases, as for any histogram; the total is every pixel
    assert voxels.totals["pooled"] == 624 * 28 * 28 and cells[inside].fillna(0).sum() <= 624 * 28 * 28
    with pytest.raises(Rejected, match="needs --range LO HI"):
        client.query("breastmnist", "hist", ["intensity"], bins=4)
