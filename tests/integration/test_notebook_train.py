"""A real kernel runs %%flip_train against four real hospital sites through Flower.

One kernel (nbclient) executes cells one by one against one local federation: bad input is
refused before or at submission, a training cell streams its rounds and returns a model,
a site whose cell raises is reported by name and exception type, and the quickstart notebook
runs headless under papermill.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient

from flip_core.paths import data_dir
from flip_core.util import wait_until
from flip_local import cli
from flip_local.federation import Federation, restart
from flip_local.sites import HEART_SITES, HEART_SPLIT
from site_agent.data.catalog import load_site
from site_agent.data.formats import add_dataset

from helpers import GATED_CELL, TINY_CELL, Gate, flip, flip_run, static_figures

SITES = sorted(HEART_SITES)
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.integration


class Kernel:
    """Executes cells one at a time in one real kernel, keeping the notebook."""

    def __init__(self) -> None:
        self.nb = nbformat.v4.new_notebook()
        self.client = NotebookClient(self.nb, timeout=600, allow_errors=True, kernel_name="python3")

    def run(self, source: str) -> list[dict[str, Any]]:
        """The cell's outputs, once the kernel has executed it."""
        cell = nbformat.v4.new_code_cell(source)
        self.nb.cells.append(cell)
        self.client.execute_cell(cell, len(self.nb.cells) - 1)
        return cell.outputs

    def text(self, source: str) -> str:
        """What the cell printed, displayed as text and raised, as one text."""
        outputs = self.run(source)
        parts = []
        for out in outputs:
            if out.get("output_type") == "stream":
                parts.append(out["text"])
            elif out.get("output_type") == "error":
                parts.append(f"{out['ename']}: {out['evalue']}")
            elif "data" in out and "text/plain" in out["data"]:
                parts.append(out["data"]["text/plain"])
        return "".join(parts)

    def json(self, source: str) -> Any:
        """The JSON document the cell printed last."""
        outputs = self.run(source)
        printed = "".join(o["text"] for o in outputs if o.get("output_type") == "stream" and o["name"] == "stdout")
        assert printed.strip(), outputs
        return json.loads(printed.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def kernel(federation: Any) -> Iterator[Kernel]:
    k = Kernel()
    with k.client.setup_kernel():
        text = k.text("%load_ext flip_magics\n%flip_connect")
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
    text = kernel.text("%%flip_train --dataset heart-disease\ndef build_model(:\n    pass\n")
    assert "UsageError: syntax error in the cell at line 1" in text
    assert len(federation.client().runs()) == before


def test_unknown_dataset_is_refused_naming_it_before_any_site_is_asked(kernel: Kernel, federation: Any) -> None:
    before = len(federation.client().runs())
    text = kernel.text("%%flip_train --dataset hearts\n" + TINY_CELL)
    assert "unknown dataset 'hearts': the datasets that exist are heart-disease" in text
    assert len(federation.client().runs()) == before  # refused at submission: no run, so no site was asked


def test_training_cell_streams_rounds_and_returns_the_model(kernel: Kernel, federation: Any) -> None:
    outputs = kernel.run("%%flip_train --dataset heart-disease --rounds 2 --seed 1 --out run\n" + GATED_CELL)
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    held = kernel.json("import json\nprint(json.dumps({'run_id': run.run_id, 'done': run.done, 'round': run.round}))")
    # every site holds round 1's training at the gate: the cell returned without waiting for the run
    assert not held["done"] and held["round"] == 0, held
    Gate(federation.home / "federation" / "sites").open(held["run_id"])
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


@pytest.fixture(scope="module")
def quickstart(federation: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The quickstart notebook executed by `flip run` (3 rounds), as the tests below rerun and export it."""
    out = tmp_path_factory.mktemp("quickstart") / "first"
    (run_id,) = flip_run("01_quickstart_heart.ipynb", out, rounds=3)["runs"]
    return {"out": out, "run_id": run_id, "record": json.loads((out / "records" / f"{run_id}.json").read_text())}


def test_flip_run_executes_the_quickstart_and_keeps_a_record_that_explains_it(quickstart: dict[str, Any]) -> None:
    out, record = quickstart["out"], quickstart["record"]
    summary = json.loads((out / "summary.json").read_text())  # the notebook's output_dir: the run's folder
    assert set(summary["site_accuracy"]) == set(SITES)
    assert summary["mean_accuracy"] >= 0.65, summary
    assert summary["flamby"]["fedavg"] == pytest.approx(0.685, abs=0.001)
    assert json.loads((out / "parameters.json").read_text())["rounds"] == 3
    notebook = record["notebook"]
    assert notebook["path"].endswith("01_quickstart_heart.ipynb") and notebook["parameters"] == {"rounds": 3}
    assert len(notebook["sha256"]) == 64 and notebook["cell"] == 1
    assert record["source_hash"].startswith("sha256:") and record["seed"] == 42
    for role in ("hub_packages", "client_packages"):
        assert {"flip", "flwr", "torch", "monai"} <= set(record[role]), record[role]
    assert record["hub_environment"].startswith("sha256:") and record["client_environment"].startswith("sha256:")
    assert set(record["site_packages"]) == set(SITES)
    for site, env in record["site_packages"].items():
        assert env["packages"]["torch"].startswith("2.13.0") and env["hash"].startswith("sha256:"), site
        assert record["site_info"][site]["device"] == "cpu" and record["site_info"][site]["fingerprint"]
        seeds = record["step_seeds"][site]
        assert len(seeds) == 4 and len(set(seeds)) == 4  # rounds 0..3: no two steps shuffle alike
    assert len({tuple(s) for s in record["step_seeds"].values()}) == len(SITES)  # nor two sites
    final = [r for r in record["history"] if r["round"] == 3 and r["phase"] == "evaluate" and r["metric"] == "accuracy"]
    assert {r["site"] for r in final} == {*SITES, "global"}
    assert record["aggregation_ordered"] is True and len(record["model_sha256"]) == 64
    assert record["finished"] >= record["started"] >= record["created"] and record["researcher"]
    assert static_figures(out / "01_quickstart_heart.ipynb"), "the executed notebook shows its run without a frontend"


def rerun(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    """``flip rerun ARGS`` in this process (the command's own code, without a second interpreter's start)."""
    code = cli.main(["rerun", *map(str, args), "--no-progress"])
    return code, capsys.readouterr().out


def test_flip_rerun_matches_every_metric_and_a_changed_seed_is_named(quickstart: dict[str, Any], capsys) -> None:
    code, out = rerun(capsys, quickstart["run_id"], "--out", quickstart["out"].parent / "again")
    assert code == 0, out
    comparison = json.loads((quickstart["out"].parent / "again" / "comparison.json").read_text())
    assert comparison["identical"] and comparison["changes"] == [], comparison["changes"]
    assert comparison["same_model"], "the same seeds, code, sites and data give the same model, bit for bit"
    assert len(comparison["rows"]) > 40 and all(r["equal"] for r in comparison["rows"])
    assert "metrics identical" in out
    code, out = rerun(capsys, quickstart["run_id"], "-p", "seed", "7", "--out", quickstart["out"].parent / "seed7")
    assert code == 3, out
    assert "the seed changed (42 → 7)" in out and "metrics differ" in out, out


def test_flip_run_of_a_notebook_whose_cell_fails_exits_naming_the_cell_and_the_reason(federation, tmp_path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [
        nbformat.v4.new_code_cell("%load_ext flip_magics\n%flip_connect"),
        nbformat.v4.new_code_cell("%%flip_train --dataset heart-disease\ndef build_model(:\n    pass"),
        nbformat.v4.new_code_cell("print('never')"),
    ]
    nbformat.write(notebook, tmp_path / "broken.ipynb")
    done = flip("run", tmp_path / "broken.ipynb", "--out", tmp_path / "out", "--no-progress")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cell 2 of broken.ipynb" in done.stderr, done.stderr
    assert "failed: UsageError: syntax error in the cell at line 1" in done.stderr, done.stderr
    assert "Nothing was submitted" in done.stderr and "Traceback" not in done.stderr
    execution = json.loads((tmp_path / "out" / "execution.json").read_text())
    assert execution["status"] == "failed" and execution["runs"] == [] and (tmp_path / "out" / "broken.ipynb").is_file()


def test_flip_compare_shows_two_runs_as_a_table_and_a_figure(kernel: Kernel, quickstart: dict[str, Any]) -> None:
    (seven,) = json.loads((quickstart["out"].parent / "seed7" / "execution.json").read_text())["runs"]
    outputs = kernel.run(f"_c = %flip_compare {quickstart['run_id']} {seven}\nprint(len(_c), int(_c.equal.sum()))")
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "the seed changed (42 → 7)" in printed, outputs
    rows, equal = map(int, printed.strip().splitlines()[-1].split())
    assert rows > 40 and equal < rows  # every metric of either run, most of them different
    assert any("image/png" in o.get("data", {}) for o in outputs), "the figure of both runs' curves"


def test_a_rerun_names_the_site_whose_dataset_changed(
    federation: Any, quickstart: dict[str, Any], tmp_path, capsys
) -> None:
    site_dir = Federation(federation.home).root / "sites" / "Switzerland"
    original = data_dir() / "heart-disease" / HEART_SITES["Switzerland"]
    changed = tmp_path / HEART_SITES["Switzerland"]
    changed.write_text("".join(original.read_text().splitlines(keepends=True)[:-1]))  # one patient fewer
    client = federation.client()

    def reregister(path: Path) -> str:
        add_dataset(load_site(site_dir), "heart-disease", path, "uci-heart", **HEART_SPLIT)
        restart("site-Switzerland", federation.home)  # the agent reads its catalog when it starts
        wanted = load_site(site_dir).datasets["heart-disease"].fingerprint
        assert wait_until(lambda: announced_fingerprint(client, "Switzerland") == wanted, 60, 0.1)
        return wanted

    before = announced_fingerprint(client, "Switzerland")
    try:
        assert reregister(changed) != before
        code, out = rerun(capsys, quickstart["run_id"], "--out", tmp_path / "rerun")
        assert code == 3, out
        assert "site Switzerland's dataset fingerprint changed" in out, out
        changes = json.loads((tmp_path / "rerun" / "comparison.json").read_text())["changes"]
        assert [c for c in changes if "fingerprint" in c] == [c for c in changes if "Switzerland" in c]
    finally:
        assert reregister(original) == before  # the other tests' federation as it was


def announced_fingerprint(client: Any, site: str) -> str | None:
    entry = next((s for s in client.sites() if s["site"] == site), None)
    if entry is None or entry["status"] != "online":
        return None
    return next((d["fingerprint"] for d in entry["datasets"] if d["name"] == "heart-disease"), None)


def test_an_exported_model_loads_from_its_folder_alone_and_passes_its_probe(quickstart: dict[str, Any]) -> None:
    folder = quickstart["out"] / "model"  # the quickstart's last cell: result.save(output_dir/model)
    assert (folder / "models" / "model.safetensors").is_file()
    blocked = "import sys; [sys.modules.__setitem__(m, None) for m in ('flip_core', 'flip_magics', 'site_agent')]; "
    loaded = subprocess.run(
        [sys.executable, "-c", blocked + "from load import load_model, check; m = load_model(); print(check())"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loaded.returncode == 0 and "True" in loaded.stdout, loaded.stderr[-2000:]
    card = json.loads((folder / "configs" / "metadata.json").read_text())["flip"]
    assert sorted(s["site"] for s in card["sites"]) == sorted(SITES) and card["rounds"] == 3
    record = quickstart["record"]
    final = {r["site"]: r["value"] for r in record["history"] if r["round"] == 3 and r["metric"] == "accuracy"}
    assert card["not_for_clinical_use"] is True and card["run_id"] == quickstart["run_id"]
    text = json.dumps(card["final_metrics"])
    assert all(repr(value)[:6] in text or str(value)[:6] in text for value in final.values()), (final, text)
    again = quickstart["out"].parent / "exported"
    done = flip("export", quickstart["run_id"], again)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "probe check" in done.stdout
    assert (again / "models" / "model.safetensors").read_bytes() == (
        folder / "models" / "model.safetensors"
    ).read_bytes()


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
