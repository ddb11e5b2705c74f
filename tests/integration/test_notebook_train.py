"""A real kernel runs %%flip_train against four real hospital sites through Flower.

One kernel (nbclient) executes cells one by one against one local federation: bad input is
refused before or at submission, a training cell streams its rounds and returns a model,
a site whose cell raises is reported by name and exception type, and the quickstart notebook
runs headless under papermill.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import papermill
import pytest
from nbclient import NotebookClient

from helpers import REPO, TINY_CELL

pytestmark = pytest.mark.integration


class Kernel:
    """Executes cells one at a time in one real kernel, keeping the notebook."""

    def __init__(self) -> None:
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(self.nb, timeout=600, allow_errors=True, kernel_name="python3")

    def run(self, source: str) -> tuple[list[dict[str, Any]], float]:
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        started = time.monotonic()
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell.outputs, time.monotonic() - started

    def text(self, source: str) -> tuple[str, float]:
        outputs, seconds = self.run(source)
        parts = []
        for out in outputs:
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif out.get("output_type") == "error":
                parts.append(f"{out['ename']}: {out['evalue']}")
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
        return "".join(parts), seconds

    def json(self, source: str) -> Any:
        """The JSON document the cell printed last."""
        outputs, _ = self.run(source)
        printed = "".join(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stdout")
        assert printed.strip(), outputs
        return json.loads(printed.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kernel(federation: Any) -> Iterator[Kernel]:
    k = Kernel()
    with k.client.setup_kernel():
        text, _ = k.text("%load_ext flip_magics\n%flip_connect")
        assert "connected to http://127.0.0.1:" in text, text
        yield k


def test_sites_are_listed_with_their_datasets(kernel: Kernel) -> None:
    rows = kernel.json("_s = %flip_sites\nimport json\nprint(json.dumps(_s.to_dict('records')))")
    assert {(r["site"], r["status"], r["dataset"]) for r in rows} == {
        (s, "online", "heart-disease") for s in ("Cleveland", "Hungary", "Switzerland", "VA")
    }
    assert {r["site"]: r["rows"] for r in rows} == {"Cleveland": 303, "Hungary": 294, "Switzerland": 123, "VA": 200}
    assert {r["device"] for r in rows} == {"cpu"}  # each site's choice (`--device auto`, no GPU here)


def test_syntax_error_is_reported_before_anything_is_submitted(kernel: Kernel, federation: Any) -> None:
    before = len(federation.client().runs())
    text, _ = kernel.text("%%flip_train --dataset heart-disease\ndef build_model(:\n    pass\n")
    assert "UsageError: syntax error in the cell at line 1" in text
    assert len(federation.client().runs()) == before


def test_unknown_dataset_is_refused_within_seconds_naming_it(kernel: Kernel) -> None:
    text, seconds = kernel.text("%%flip_train --dataset hearts\n" + TINY_CELL)
    assert "unknown dataset 'hearts': the datasets that exist are heart-disease" in text
    assert seconds < 5, f"refusal took {seconds:.1f} s"


def test_training_cell_streams_rounds_and_returns_the_model(kernel: Kernel) -> None:
    outputs, seconds = kernel.run("%%flip_train --dataset heart-disease --rounds 2 --seed 1 --out run\n" + TINY_CELL)
    assert seconds < 30, "the cell must return at once, not wait for the run"
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    result = kernel.json(
        "run.wait()\n"
        "first = min(e['received'] for e in run.events if e['type'] == 'metrics' and e['round'] == 1)\n"
        "last = max(e['ts'] for e in run.events if e['type'] == 'round')\n"
        "h = run.history\n"
        "print(json.dumps({'first': first, 'last': last, 'status': run.status,\n"
        "  'shapes': {k: list(v.shape) for k, v in run.model.state_dict().items()},\n"
        "  'rounds': sorted(set(h['round'])), 'sites': sorted(set(h.site)),\n"
        "  'record': {k: run.record[k] for k in ('model_sha256', 'source_hash', 'sites', 'seed')}}))"
    )
    assert result["status"] == "completed"
    assert result["first"] < result["last"], "round 1 metrics reached the notebook only after the last round"
    assert result["shapes"] == {"weight": [1, 3], "bias": [1]}
    assert result["rounds"] == [0, 1, 2]
    assert result["sites"] == ["Cleveland", "Hungary", "Switzerland", "VA", "global"]
    assert len(result["record"]["model_sha256"]) == 64 and result["record"]["seed"] == 1


def test_a_cell_that_raises_at_one_site_names_the_site_and_exception(kernel: Kernel) -> None:
    raising = TINY_CELL.replace(
        "def train(model, data, config):\n",
        "def train(model, data, config):\n    if data.site == 'Hungary':\n        1 / 0\n",
    )
    line = raising.splitlines().index("        1 / 0") + 1
    kernel.run("%%flip_train --dataset heart-disease --rounds 1 --min-sites 3 --out bad\n" + raising)
    result = kernel.json("bad.wait()\nprint(json.dumps({'status': bad.status, 'sites': bad.site_rows()}))")
    assert result["status"] == "completed"
    rows = {r["site"]: r for r in result["sites"]}
    assert rows["Hungary"]["status"] == "failed"
    assert rows["Hungary"]["detail"] == f"ZeroDivisionError at cell line {line} in train()"
    assert {rows[s]["status"] for s in ("Cleveland", "Switzerland", "VA")} == {"done"}


def test_attach_replays_a_finished_run(kernel: Kernel) -> None:
    result = kernel.json(
        "%flip_attach {run.run_id} --out again\n"
        "again.wait()\n"
        "print(json.dumps({'same': again.history.equals(run.history), 'status': again.status}))"
    )
    assert result == {"same": True, "status": "completed"}
    statuses = kernel.json("_r = %flip_runs\nprint(json.dumps(_r.status.tolist()))")
    assert statuses.count("completed") >= 2


def test_quickstart_notebook_runs_headless_under_papermill(federation: Any, tmp_path: Path) -> None:
    out = tmp_path / "quickstart.ipynb"
    papermill.execute_notebook(
        str(REPO / "notebooks" / "01_quickstart_heart.ipynb"),
        str(out),
        parameters={"rounds": 3, "output_dir": str(tmp_path)},
        progress_bar=False,
        cwd=str(tmp_path),
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["site_accuracy"]) == {"Cleveland", "Hungary", "Switzerland", "VA"}
    assert summary["mean_accuracy"] >= 0.65, summary
    assert summary["flamby"]["fedavg"] == pytest.approx(0.685, abs=0.001)
    executed = nbformat.read(out, as_version=4)
    assert "widgets" in executed.metadata, "the live widget's final state is saved in the notebook"


def test_a_rerun_with_the_same_seed_gives_the_same_model(federation: Any) -> None:
    minibatch = TINY_CELL.replace(
        "        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X).squeeze(1), y)",
        "        batch = torch.randint(0, len(y), (8,))\n"
        "        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X[batch]).squeeze(1), y[batch])",
    )
    assert minibatch != TINY_CELL
    client = federation.client()
    # side by side: each run has its own task process at every site, and its own seeds
    first, second = [client.train(minibatch, dataset="heart-disease", rounds=1, seed=11) for _ in range(2)]
    first.wait(), second.wait()
    assert first.record["model_sha256"] == second.record["model_sha256"]
    assert first.history.equals(second.history)
