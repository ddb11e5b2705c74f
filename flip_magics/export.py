"""Export a trained model with its model card, as a folder laid out like a MONAI bundle.

The folder needs no FLIP to be used: ``scripts/model.py`` is the ``%%flip_train`` cell's own source (it defines
``build_model()``), ``models/model.safetensors`` the weights (a format that runs no code when loaded), and
``load.py`` loads them with the standard library, torch and safetensors only. ``models/probe.safetensors`` holds an
input and the model's output on it, so that ``python load.py --check`` (and :func:`verify_export`) can show the
loaded model computes what the exported one did. ``configs/metadata.json`` is MONAI's bundle metadata plus a
``flip`` block (the run's provenance); ``README.md`` the model card. No IPython here.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flip_core import __version__
from flip_core.cell import normalise_source, task_hash
from flip_core.errors import FlipError
from flip_core.records import final_metrics
from flip_core.runs import RunRecord
from flip_core.versions import package_versions

MONAI_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)
FLIP_PACKAGES = ("flip_core", "flip_magics", "site_agent", "coordinator", "flip_local")
PROBE_SIDE = 32  # the spatial size of an inferred convolution probe
VERIFY_TIMEOUT_S = 120
INTENDED_USE = "Research only; not for clinical use"

LOAD_PY = '''\
"""Load this exported FLIP model with the standard library, torch and safetensors only (no FLIP needed).

    from load import load_model
    model = load_model()          # build_model() from scripts/model.py, the weights, eval mode

python load.py --check: run the stored probe input through the loaded model, compare with the stored output.
"""

import importlib.util
import json
import sys
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent


def load_model(folder=HERE):
    folder = Path(folder)
    name = f"flip_exported_model_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, folder / "scripts" / "model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    model = module.build_model()
    model.load_state_dict(load_file(str(folder / "models" / "model.safetensors")), strict=True)
    return model.eval()


def check(folder=HERE):
    probe = load_file(str(Path(folder) / "models" / "probe.safetensors"))
    with torch.no_grad():
        output = load_model(folder)(probe["input"])
    expected = probe["output"]
    if not isinstance(output, torch.Tensor) or output.shape != expected.shape:
        return {"ok": False, "equal": False, "max_abs_diff": float("inf")}
    equal = torch.equal(output, expected)
    diff = (output.double() - expected.double()).abs().max().item() if output.numel() else 0.0
    close = torch.allclose(output.double(), expected.double(), rtol=1e-5, atol=1e-6, equal_nan=True)
    return {"ok": bool(equal or close), "equal": bool(equal), "max_abs_diff": float(diff)}


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        result = check()
        print(json.dumps(result))
        sys.exit(0 if result["ok"] else 1)
    print(load_model())
'''


class ExportFailed(FlipError):
    """A model could not be exported, or an exported folder does not load and reproduce its probe."""


def export_model(
    directory: str | Path,
    *,
    model: torch.nn.Module,
    source: str,
    record: RunRecord,
    example: torch.Tensor | None = None,
) -> Path:
    """Write ``model`` (built by ``source``'s ``build_model()``, with its final weights) and its model card into
    ``directory`` (created; an existing folder must be empty). Returns the folder."""
    folder = Path(directory)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ExportFailed(f"{folder} exists and is not an empty folder; export into a new one.")
    imports = _check_source(source, record)
    weights = _weights(model)
    probe_in, probe_out = _probe(model, example)
    run_id = record.run_id
    for sub in ("models", "scripts", "configs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    # one metadata key: safetensors writes a map's keys in any order, and the file's bytes must not vary
    save_file(weights, str(folder / "models" / "model.safetensors"), metadata={"format": "pt"})
    save_file({"input": probe_in, "output": probe_out}, str(folder / "models" / "probe.safetensors"))
    header = (
        f"# The %%flip_train cell of FLIP run {run_id or '(unknown)'}: the model's architecture.\n"
        "# It defines build_model(); FLIP is not needed to import it (load.py does).\n\n"
    )
    (folder / "scripts" / "model.py").write_text(header + normalise_source(source), encoding="utf-8")
    (folder / "load.py").write_text(LOAD_PY, encoding="utf-8")
    weights_hash = "sha256:" + hashlib.sha256((folder / "models" / "model.safetensors").read_bytes()).hexdigest()
    meta = _metadata(record, probe_in, probe_out, weights_hash, uses_monai="monai" in imports)
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    (folder / "README.md").write_text(_model_card(meta), encoding="utf-8")
    return folder


def verify_export(directory: str | Path) -> dict[str, Any]:
    """Run the folder's ``load.py --check`` in a fresh Python where every FLIP package is blocked: the folder loads
    on its own and its model reproduces the stored probe output. Returns ``{"ok", "max_abs_diff", ...}``."""
    folder = Path(directory)
    if not (folder / "load.py").is_file():
        raise ExportFailed(f"{folder} holds no load.py; it is not an exported model folder.")
    code = (
        "import sys, runpy; "
        f"[sys.modules.__setitem__(m, None) for m in {FLIP_PACKAGES!r}]; "
        "sys.argv = ['load.py', '--check']; runpy.run_path('load.py', run_name='__main__')"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S
        )
    except subprocess.TimeoutExpired as exc:
        raise ExportFailed(f"checking the export in {folder} took over {VERIFY_TIMEOUT_S} s.") from exc
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    last_error = errors[-1] if errors else "no error output"
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError) as exc:
        raise ExportFailed(
            f"the export in {folder} does not load without FLIP (exit status {done.returncode}): {last_error}"
        ) from exc
    if not result.get("ok"):
        raise ExportFailed(
            f"the model loaded from {folder} does not reproduce the stored probe output "
            f"(max abs diff {result.get('max_abs_diff')}): the weights or scripts/model.py changed."
        )
    return result


def _check_source(source: str, record: RunRecord) -> set[str]:
    """The top-level modules the cell imports; refuses a source that is not the run's cell or has no build_model."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ExportFailed(f"the cell source has a syntax error at line {exc.lineno}; pass the run's cell.") from exc
    if not any(isinstance(node, ast.FunctionDef) and node.name == "build_model" for node in tree.body):
        raise ExportFailed("the cell source defines no build_model(); pass the %%flip_train cell the run trained.")
    if record.source_hash and record.source_hash != task_hash(source, record.covariates):
        raise ExportFailed(f"the cell source is not the one run {record.run_id} trained (its hash differs).")
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as safetensors stores it: detached, on the CPU, contiguous, sharing no memory."""
    weights = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise ExportFailed(f"the model's state_dict holds {key!r}, a {type(value).__name__}, not a tensor.")
        weights[key] = value.detach().cpu().contiguous().clone()
    return weights


def probe_input(model: torch.nn.Module) -> torch.Tensor | None:
    """An input inferred from the model's first Linear or Conv layer (batch of 2, seeded), or None."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            shape = [module.in_features]
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            shape = [module.in_channels] + [PROBE_SIDE] * (module.weight.dim() - 2)
        else:
            continue
        if min(shape) <= 0:  # a lazy layer not yet materialised
            return None
        dtype = module.weight.dtype if module.weight.is_floating_point() else torch.float32
        return torch.randn([2, *shape], generator=generator).to(dtype)
    return None


def _probe(model: torch.nn.Module, example: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The probe's input (``example``, else inferred) and the model's output on it, in eval mode, on the CPU."""
    probe = example.detach().cpu().contiguous().clone() if example is not None else probe_input(model)
    if probe is None:
        raise ExportFailed(
            "cannot infer an input for this model (its first layer is neither Linear nor Conv); "
            "give example=<an input tensor> to export_model."
        )
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    net = model if on_cpu else copy.deepcopy(model).cpu()
    modes = {module: module.training for module in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            output = net(probe)
    except Exception as exc:
        raise ExportFailed(
            f"the model fails on a probe input of shape {list(probe.shape)} ({type(exc).__name__}: {exc}); "
            "give example=<an input tensor> to export_model."
        ) from exc
    finally:
        for module, training in modes.items():
            module.train(training)
    if not isinstance(output, torch.Tensor):
        raise ExportFailed(
            f"the model returns a {type(output).__name__}, not a tensor; only a model with one output is exported."
        )
    return probe, output.detach().cpu().contiguous().clone()


def _tensor_format(tensor: torch.Tensor, *, is_input: bool) -> dict[str, Any]:
    """A MONAI tensor format specifier from a probe tensor (its first dimension is the batch)."""
    image = tensor.dim() >= 3
    kind = "image" if image else "tuples"
    return {
        "type": kind,
        "format": ("magnitude" if image else "features") if is_input else "predictions",
        "modality": "n/a",
        "num_channels": int(tensor.shape[1]) if tensor.dim() >= 2 else 1,
        "spatial_shape": [int(side) for side in tensor.shape[2:]],
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "value_range": [],
        "is_patch_data": False,
        "channel_def": {},
    }


def _iso(timestamp: Any) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(float(timestamp), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _site_block(record: RunRecord, site: str) -> dict[str, Any]:
    """What the model card says of one site: its split, its device, its data's fingerprint (None where unknown)."""
    used = record.site_info.get(site)
    return {
        "site": site,
        "train_rows": used.train_rows if used else None,
        "test_rows": used.test_rows if used else None,
        "device": used.device if used else None,
        "dataset_fingerprint": used.fingerprint if used else None,
    }


def _flip_block(record: RunRecord, weights_hash: str) -> dict[str, Any]:
    """The run's provenance, from its record."""
    sites = list(record.sites or record.site_info)
    config = dict(record.config)
    epsilon, clip = config.get("dp_epsilon"), config.get("dp_clip")
    metrics = final_metrics(record.history)
    order = {name: i for i, name in enumerate(["global", *sites])}
    return {
        "run_id": record.run_id,
        "name": record.name,
        "project": record.project,
        "researcher": record.researcher,
        "dataset": record.dataset,
        "sites": [_site_block(record, site) for site in sites],
        "rounds": record.rounds,
        "strategy": record.strategy,
        "strategy_options": dict(record.strategy_options),
        "seed": record.seed,
        "config": config,
        "final_metrics": dict(sorted(metrics.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0]))),
        "privacy": {"differential_privacy": epsilon is not None, "epsilon": epsilon, "clip": clip},
        "source_hash": record.source_hash,
        "model_sha256": record.model_sha256,
        "weights_sha256": weights_hash,
        "created": _iso(record.created),
        "finished": _iso(record.finished),
        "hub_packages": dict(record.hub_packages),
        "exported_by": f"flip {__version__}",
        "not_for_clinical_use": True,
    }


def _metadata(
    record: RunRecord, probe_in: torch.Tensor, probe_out: torch.Tensor, weights_hash: str, *, uses_monai: bool
) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's bundle metadata fields and the ``flip`` block."""
    flip = _flip_block(record, weights_hash)
    versions = package_versions("monai", "numpy", "safetensors")
    required = {"torch": torch.__version__.split("+")[0], "safetensors": versions.get("safetensors", "")}
    if uses_monai and "monai" in versions:
        required["monai"] = versions["monai"]
    name, run_id = flip["name"] or "model", flip["run_id"] or "(unknown)"
    site_names = ", ".join(s["site"] for s in flip["sites"]) or "no named sites"
    researcher = flip["researcher"] or "the researcher"
    return {
        "schema": MONAI_SCHEMA,
        "version": "0.1.0",
        "changelog": {"0.1.0": f"exported by FLIP {__version__} from run {run_id}"},
        "monai_version": versions.get("monai", ""),
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": versions.get("numpy", ""),
        "required_packages_version": required,
        "task": f"{name}: trained by federated learning on dataset {flip['dataset']}",
        "description": (
            f"A model trained by FLIP run {run_id} over {len(flip['sites'])} sites ({site_names}) for "
            f"{flip['rounds']} rounds with {flip['strategy']}; the data never left the sites. "
            "scripts/model.py is the training cell (it defines build_model()); load.py loads the weights."
        ),
        "authors": researcher,
        "copyright": f"Copyright (c) {researcher}",
        "data_source": f"dataset {flip['dataset']} at the sites {site_names}, through FLIP",
        "eval_metrics": flip["final_metrics"].get("global", {}),
        "intended_use": INTENDED_USE,
        "network_data_format": {
            "inputs": {"input": _tensor_format(probe_in, is_input=True)},
            "outputs": {"pred": _tensor_format(probe_out, is_input=False)},
        },
        "flip": flip,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace("|", "\\|")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def _model_card(meta: dict[str, Any]) -> str:
    """``README.md``: the model card, from the metadata."""
    flip = meta["flip"]
    sites, metrics, privacy = flip["sites"], flip["final_metrics"], flip["privacy"]
    keys = sorted({key for values in metrics.values() for key in values})
    options = ", ".join(f"{k}={v}" for k, v in sorted(flip["strategy_options"].items())) or "defaults"
    dp = (
        f"differential privacy: epsilon {_cell(privacy['epsilon'])}, clip {_cell(privacy['clip'])}"
        if privacy["differential_privacy"]
        else "no differential privacy"
    )
    shape = meta["network_data_format"]["inputs"]["input"]
    described = (
        f"an image of {shape['num_channels']} channels, spatial shape {shape['spatial_shape']}"
        if shape["type"] == "image"
        else f"{shape['num_channels']} features"
    )
    lines = [
        f"# {flip['name'] or 'FLIP model'} (run {flip['run_id'] or 'unknown'})",
        "",
        "**Research use only, not for clinical use.**",
        "",
        f"{meta['description']}",
        "",
        f"- Project: {_cell(flip['project'])}; researcher: {_cell(flip['researcher'])}",
        f"- Dataset: {_cell(flip['dataset'])}",
        f"- Rounds: {_cell(flip['rounds'])}; strategy: {_cell(flip['strategy'])} ({options}); "
        f"seed {_cell(flip['seed'])}",
        f"- Trained: {_cell(flip['created'])} to {_cell(flip['finished'])}",
        f"- Input: {described}, {shape['dtype']} (batch first)",
        "",
        "## Sites",
        "",
        *_table(
            ["site", "train rows", "test rows", "device"],
            [[s["site"], s["train_rows"], s["test_rows"], s["device"]] for s in sites],
        ),
        "",
        "## Final metrics (last round)",
        "",
        *_table(["series", *keys], [[series, *(values.get(k) for k in keys)] for series, values in metrics.items()]),
        "",
        "## Privacy",
        "",
        f"Trained with {dp}.",
        "",
        "## Data fingerprints",
        "",
        *[f"- {s['site']}: `{_cell(s['dataset_fingerprint'])}`" for s in sites],
        "",
        "## Provenance",
        "",
        f"- Cell source: `{_cell(flip['source_hash'])}` (scripts/model.py)",
        f"- Model: `{_cell(flip['model_sha256'])}`; weights file: `{flip['weights_sha256']}`",
        f"- Hub packages: {', '.join(f'{k} {v}' for k, v in sorted(flip['hub_packages'].items())) or '–'}",
        "",
        "## Load and check",
        "",
        "Needs Python with torch and safetensors only (not FLIP). From this folder:",
        "",
        "```python",
        "from load import load_model",
        "",
        "model = load_model()  # build_model() from scripts/model.py, the weights, eval mode",
        "```",
        "",
        "```",
        'python load.py --check  # the stored probe\'s output, reproduced: prints {"ok": true, ...}',
        "```",
        "",
    ]
    return "\n".join(lines)


__all__ = ["LOAD_PY", "ExportFailed", "export_model", "final_metrics", "probe_input", "verify_export"]
