"""Behaviour tests for flip_magics.export: a trained model exported with its model card, loadable without FLIP."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flip_core.cell import normalise_source, source_hash
from flip_core.runs import MetricRow, RunRecord
from flip_magics.export import LOAD_PY, ExportFailed, export_model, final_metrics, verify_export

SOURCE = """\
import torch


def build_model():
    return torch.nn.Linear(13, 1)


def train(model, data, config):
    return {"loss": 0.0}


def evaluate(model, data, config):
    return {"auc": 0.5}
"""

CONV_SOURCE = """\
import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4, 2))


def train(model, data, config):
    return {}


def evaluate(model, data, config):
    return {}
"""

EMBEDDING_SOURCE = SOURCE.replace("torch.nn.Linear(13, 1)", "torch.nn.Embedding(10, 4)")
FLIP = ("flip_core", "flip_magics", "site_agent", "coordinator", "flip_local")
FILES = {
    "README.md",
    "load.py",
    "configs/metadata.json",
    "models/model.safetensors",
    "models/probe.safetensors",
    "scripts/model.py",
}


def _history() -> list[dict[str, Any]]:
    rows = []
    for round_ in (1, 2, 3):
        rows.append(
            {"round": round_, "site": "global", "phase": "evaluate", "metric": "auc", "value": 0.6 + round_ / 16}
        )
        for i, site in enumerate(("st-thomas", "kings")):
            rows.append({"round": round_, "site": site, "phase": "fit", "metric": "loss", "value": 1 / (round_ + i)})
            rows.append(
                {"round": round_, "site": site, "phase": "evaluate", "metric": "auc", "value": 0.5 + round_ / 8}
            )
    return rows[::-1]  # the order of rows does not decide which round is the last


def _bare(run_id: str = "") -> RunRecord:
    """A record that says nothing of the run beyond what every record has."""
    return RunRecord(run_id=run_id, name="", dataset="", rounds=0, seed=0, source_hash="", sites=[], created=0.0)


def _record(source: str = SOURCE, **extra: Any) -> RunRecord:
    raw = {
        "run_id": "r-0042",
        "name": "heart-linear",
        "project": "cardio",
        "researcher": "dr.ada",
        "dataset": "heart",
        "rounds": 3,
        "strategy": "fedavg",
        "strategy_options": {"fraction_fit": 1.0},
        "seed": 7,
        "config": {"lr": 0.01, "dp_epsilon": 4.0, "dp_clip": 1.5},
        "source_hash": source_hash(source),
        "model_sha256": "sha256:" + "ab" * 32,
        "sites": ["st-thomas", "kings"],
        "site_info": {
            "st-thomas": {
                "train_rows": 240,
                "test_rows": 60,
                "device": "cpu",
                "fingerprint": "sha256:f1",
                "version": "1",
            },
            "kings": {"train_rows": 180, "test_rows": 45, "device": "cuda", "fingerprint": "sha256:f2", "version": "1"},
        },
        "history": _history(),
        "created": 1_700_000_000,
        "finished": 1_700_000_090.5,
        "hub_packages": {"python": "3.11.9", "flip": "0.1.0", "flwr": "1.42.0", "torch": "2.13.0"},
        **extra,
    }
    return RunRecord.model_validate(raw)


def _build(source: str) -> torch.nn.Module:
    namespace: dict[str, Any] = {}
    exec(compile(source, "<cell>", "exec"), namespace)
    model: torch.nn.Module = namespace["build_model"]()
    return model


def _linear() -> torch.nn.Module:
    model = _build(SOURCE)
    with torch.no_grad():
        for i, param in enumerate(model.parameters()):
            param.copy_(torch.linspace(-1.0, 1.0, param.numel()).reshape(param.shape) * (i + 2))
    return model


def _without_flip(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    block = f"import sys; [sys.modules.__setitem__(m, None) for m in {FLIP!r}]; sys.path.insert(0, '.')\n"
    return subprocess.run([sys.executable, "-c", block + code], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_an_export_is_a_bundle_folder_whose_model_loads_without_flip(tmp_path: Path) -> None:
    model = _linear()
    folder = export_model(tmp_path / "export", model=model, source=SOURCE, record=_record())
    assert folder == tmp_path / "export"
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == FILES
    with safe_open(str(folder / "models" / "model.safetensors"), framework="pt") as fh:
        assert fh.metadata() == {"format": "pt"}
    probe = load_file(str(folder / "models" / "probe.safetensors"))
    assert probe["input"].shape == (2, 13)
    assert torch.equal(probe["output"], model.eval()(probe["input"]).detach())
    assert verify_export(folder) == {"ok": True, "equal": True, "max_abs_diff": 0.0}

    done = _without_flip(
        "from safetensors.torch import save_file\nfrom load import load_model\nm = load_model()\n"
        "assert not m.training\nsave_file(m.state_dict(), 'loaded.safetensors')\n",
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    loaded = load_file(str(folder / "loaded.safetensors"))
    original = model.state_dict()
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[k], original[k]) for k in original)


def test_load_py_imports_only_the_standard_library_torch_and_safetensors() -> None:
    imported = set()
    for node in ast.walk(ast.parse(LOAD_PY)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"torch", "safetensors"}


def test_the_architecture_is_the_cells_own_source_under_a_header(tmp_path: Path) -> None:
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_record())
    script = (folder / "scripts" / "model.py").read_text()
    header, _, body = script.partition("\n\n")
    assert "r-0042" in header and "defines build_model(); FLIP is not needed to import it" in header
    assert body == normalise_source(SOURCE)


def test_the_metadata_names_sites_rounds_final_metrics_and_privacy(tmp_path: Path) -> None:
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_record())
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert meta["schema"].endswith(".json") and meta["intended_use"] == "Research only; not for clinical use"
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert {"monai_version", "numpy_version", "required_packages_version", "task", "authors"} <= meta.keys()
    data = meta["network_data_format"]
    assert (data["inputs"]["input"]["num_channels"], data["inputs"]["input"]["dtype"]) == (13, "float32")
    assert (data["outputs"]["pred"]["num_channels"], data["outputs"]["pred"]["spatial_shape"]) == (1, [])
    flip = meta["flip"]
    assert flip["sites"] == [
        {"site": "st-thomas", "train_rows": 240, "test_rows": 60, "device": "cpu", "dataset_fingerprint": "sha256:f1"},
        {"site": "kings", "train_rows": 180, "test_rows": 45, "device": "cuda", "dataset_fingerprint": "sha256:f2"},
    ]
    assert (flip["run_id"], flip["rounds"], flip["strategy"], flip["seed"]) == ("r-0042", 3, "fedavg", 7)
    assert flip["final_metrics"] == {
        "global": {"evaluate auc": 0.6 + 3 / 16},
        "st-thomas": {"evaluate auc": 0.875, "fit loss": 1 / 3},
        "kings": {"evaluate auc": 0.875, "fit loss": 0.25},
    }
    assert list(flip["final_metrics"]) == ["global", "st-thomas", "kings"]
    assert flip["privacy"] == {"differential_privacy": True, "epsilon": 4.0, "clip": 1.5}
    assert (flip["created"], flip["finished"]) == ("2023-11-14T22:13:20Z", "2023-11-14T22:14:50Z")
    assert flip["source_hash"] == source_hash(SOURCE) and flip["not_for_clinical_use"] is True
    assert flip["weights_sha256"].startswith("sha256:") and flip["hub_packages"]["flwr"] == "1.42.0"
    again = export_model(tmp_path / "f", model=_linear(), source=SOURCE, record=_record())
    assert (again / "configs" / "metadata.json").read_text() == (folder / "configs" / "metadata.json").read_text()


def test_the_readme_is_a_model_card(tmp_path: Path) -> None:
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_record())
    card = (folder / "README.md").read_text()
    assert card.startswith("# heart-linear (run r-0042)\n")
    assert "**Research use only, not for clinical use.**" in card
    assert "| st-thomas | 240 | 60 | cpu |" in card and "| kings | 180 | 45 | cuda |" in card
    assert "Rounds: 3; strategy: fedavg (fraction_fit=1.0)" in card
    assert "Input: 13 features, float32" in card
    assert "| series | evaluate auc | fit loss |" in card
    assert "| global | 0.7875 | – |" in card and "| kings | 0.875 | 0.25 |" in card
    assert "| st-thomas | 0.875 | 0.333333 |" in card
    assert "epsilon 4, clip 1.5" in card
    assert "- st-thomas: `sha256:f1`" in card and "- kings: `sha256:f2`" in card
    assert "from load import load_model" in card and "python load.py --check" in card


def test_without_differential_privacy_the_card_says_so(tmp_path: Path) -> None:
    record = _record(config={"lr": 0.1})
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=record)
    flip = json.loads((folder / "configs" / "metadata.json").read_text())["flip"]
    assert flip["privacy"] == {"differential_privacy": False, "epsilon": None, "clip": None}
    assert "no differential privacy" in (folder / "README.md").read_text()


def test_a_conv_model_gets_a_seeded_image_probe_and_keeps_its_training_mode(tmp_path: Path) -> None:
    model = _build(CONV_SOURCE)
    model.train()
    first = export_model(tmp_path / "a", model=model, source=CONV_SOURCE, record=_bare("c1"))
    assert all(m.training for m in model.modules())  # dropout is back on
    probe = load_file(str(first / "models" / "probe.safetensors"))
    assert probe["input"].shape == (2, 3, 32, 32) and probe["output"].shape == (2, 2)
    assert torch.equal(probe["input"], torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    second = export_model(tmp_path / "b", model=model, source=CONV_SOURCE, record=_bare("c1"))
    assert torch.equal(load_file(str(second / "models" / "probe.safetensors"))["output"], probe["output"])
    image = json.loads((first / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["input"]
    assert (image["type"], image["num_channels"], image["spatial_shape"]) == ("image", 3, [32, 32])
    assert verify_export(first)["ok"] is True


def test_a_model_whose_input_cannot_be_inferred_needs_an_example(tmp_path: Path) -> None:
    model = _build(EMBEDDING_SOURCE)
    with pytest.raises(ExportFailed, match=r"give example=<an input tensor>"):
        export_model(tmp_path / "e", model=model, source=EMBEDDING_SOURCE, record=_bare())
    assert not (tmp_path / "e" / "models").exists()  # nothing written

    example = torch.tensor([[1, 2, 3], [4, 5, 6]])
    folder = export_model(tmp_path / "e", model=model, source=EMBEDDING_SOURCE, record=_bare(), example=example)
    probe = load_file(str(folder / "models" / "probe.safetensors"))
    assert torch.equal(probe["input"], example) and probe["output"].shape == (2, 3, 4)
    assert verify_export(folder)["ok"] is True


def test_an_example_the_model_cannot_take_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportFailed, match=r"shape \[2, 5\].*give example="):
        export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_bare(), example=torch.zeros(2, 5))


def test_weights_that_changed_fail_the_check(tmp_path: Path) -> None:
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_record())
    other = {k: v + 1.0 for k, v in _linear().state_dict().items()}
    save_file(other, str(folder / "models" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ExportFailed, match="does not reproduce the stored probe output"):
        verify_export(folder)


def test_the_check_runs_with_flip_blocked_and_names_the_error(tmp_path: Path) -> None:
    folder = export_model(tmp_path / "e", model=_linear(), source=SOURCE, record=_record())
    script = folder / "scripts" / "model.py"
    script.write_text("import flip_core\n" + script.read_text())
    with pytest.raises(ExportFailed, match=r"does not load without FLIP.*flip_core"):
        verify_export(folder)


def test_an_export_needs_an_empty_folder_and_the_runs_own_cell(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ExportFailed, match="not an empty folder"):
        export_model(tmp_path / "full", model=_linear(), source=SOURCE, record=_record())
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["notes.txt"]
    (tmp_path / "empty").mkdir()
    assert export_model(tmp_path / "empty", model=_linear(), source=SOURCE, record=_record()).is_dir()
    with pytest.raises(ExportFailed, match="not the one run r-0042 trained"):
        export_model(tmp_path / "other", model=_linear(), source=SOURCE + "# edited\n", record=_record())


def test_final_metrics_take_each_series_last_round() -> None:
    rows = [
        MetricRow(round=2, site="a", phase="fit", metric="loss", value=0.2),
        MetricRow(round=1, site="a", phase="fit", metric="loss", value=0.9),
        MetricRow(round=1, site="global", phase="evaluate", metric="auc", value=0.7),
    ]
    assert final_metrics(rows) == {"a": {"fit loss": 0.2}, "global": {"evaluate auc": 0.7}}
