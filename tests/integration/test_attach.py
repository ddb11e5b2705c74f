"""A kernel restarted mid-run: ``%flip_attach`` resumes the live view from the last round.

Real processes only: a SuperLink, the coordinator and four site agents (the module's
``federation``), and one real kernel (nbclient) that starts a run, is restarted by its kernel
manager while the run is between rounds, and then attaches to the run again.

The run's cell holds its sites in ``train()`` from round 3 until the test opens a gate (a file the
test puts in each site's scratch folder for the run, the one place of the host a task process sees;
each site waits for it). That is the workload, not
synchronisation of the test: it keeps the run provably mid-run (two rounds done,
the third blocked) across the restart and the attach, and the test opens the gate only once the
attached view has caught up. Every wait is on an observable condition, with a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
from nbclient.util import ensure_async, run_sync
from test_notebook_train import Kernel

from flip_core.util import wait_until
from flip_magics.client import TERMINAL

from helpers import GATED_CELL, Gate

pytestmark = pytest.mark.integration

ROUNDS = 4
HOLD_FROM = 3  # train() of this round waits for the gate: rounds 1 and 2 finish before it opens
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def gate(federation: Any) -> Gate:
    return Gate(federation.home / "federation" / "sites")


T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T], seconds: float = 180.0) -> T:
    """Wait until ``probe`` returns something truthy and return it; fail naming ``what`` at the deadline."""
    seen: list[T] = []

    def holds() -> bool:
        seen[:] = [probe()]
        return bool(seen[0])

    assert wait_until(holds, seconds, 0.1), f"after {seconds:.0f} s still waiting for {what}"
    return seen[0]


def coordinator_events(federation: Any, run_id: str) -> list[dict[str, Any]]:
    """The run's events as the coordinator stores them (the non-streaming form of the endpoint)."""
    client = federation.client()
    response = client.session.get(f"{client.url}/api/runs/{run_id}/events", params={"stream": "0"}, timeout=30)
    response.raise_for_status()
    return response.json()  # type: ignore[no-any-return]


def restart(kernel: Kernel) -> None:
    """Restart the kernel process through its manager, then talk to the new one on a fresh client."""
    nb = kernel.client

    async def _restart() -> None:
        await ensure_async(nb.km.restart_kernel(now=True))
        await ensure_async(nb.kc.stop_channels())
        await nb.async_start_new_kernel_client()  # returns once the restarted kernel answers

    run_sync(_restart)()


def widget_model_id(outputs: list[dict[str, Any]]) -> str:
    ids = [o["data"][WIDGET_MIME]["model_id"] for o in outputs if WIDGET_MIME in o.get("data", {})]
    assert len(ids) == 1, f"expected the attach cell to display one run widget, got {outputs}"
    return ids[0]


def test_attach_after_a_kernel_restart_resumes_the_live_view_from_the_last_round(federation: Any, gate: Gate) -> None:
    kernel = Kernel()
    with kernel.client.setup_kernel():
        # -- kernel A: start the run -----------------------------------------------------------
        text = kernel.text("%load_ext flip_magics\n%flip_connect")
        assert "connected to http://127.0.0.1:" in text, text
        outputs = kernel.run(
            f"%%flip_train --dataset heart-disease --rounds {ROUNDS} --seed 3 --out run "
            f"--config hold_from={HOLD_FROM}\n" + GATED_CELL
        )
        assert any(WIDGET_MIME in o.get("data", {}) for o in outputs), outputs
        before = kernel.json(
            "import json, os\nprint(json.dumps({'run_id': run.run_id, 'pid': os.getpid(), 'done': run.done}))"
        )
        run_id = before["run_id"]
        assert not before["done"], "the training cell must return at once, not wait for the run (held at the gate)"

        # -- the coordinator shows rounds 1 and 2 done, round 3 held ---------------------------
        def two_rounds_done() -> bool:
            view = federation.client().run(run_id)
            assert view["status"] not in TERMINAL, f"the run ended before the restart: {view}"
            done = {e["round"] for e in coordinator_events(federation, run_id) if e["type"] == "round"}
            assert done <= {1, 2}, f"round {max(done)} finished with the gate shut"
            return done == {1, 2}

        wait_for("rounds 1 and 2 of the run at the coordinator", two_rounds_done)

        # -- restart the kernel for real ---------------------------------------------------------
        restart(kernel)
        after = kernel.json("import json, os\nprint(json.dumps({'pid': os.getpid(), 'run': 'run' in globals()}))")
        assert after["pid"] != before["pid"], "the kernel process did not change"
        assert after["run"] is False, "the restarted kernel still has the old run handle"
        view = federation.client().run(run_id)
        assert view["status"] == "running", f"the run must outlive the kernel: {view['status']}: {view['reason']}"

        # -- the restarted kernel attaches ------------------------------------------------------
        text = kernel.text("%load_ext flip_magics\n%flip_connect")
        assert "connected to http://127.0.0.1:" in text, text
        outputs = kernel.run(f"%flip_attach {run_id} --out again")
        assert not [o for o in outputs if o.get("output_type") == "error"], outputs
        assert kernel.json("print(json.dumps(again.done))") is False, "%flip_attach must return at once (run held)"
        model_id = widget_model_id(outputs)

        # The attached view replays the past and stands at round 2 of 4, still running.
        caught_up = kernel.json(
            "import json, threading\n"
            "from ipywidgets import widget_serialization\n"
            f"box = widget_serialization['from_json']('IPY_MODEL_{model_id}', None)\n"
            "caught = threading.Event()\n"  # the widget redraws first (it subscribed first), then this runs
            f"again.subscribe(lambda h: caught.set() if h.round >= 2 and 'round 2/{ROUNDS}' in box.children[0].value"
            " else None)\n"
            "caught.wait(120)\n"
            "h = again.history\n"
            "print(json.dumps({'round': again.round, 'status': again.status, 'header': box.children[0].value,\n"
            "  'rounds': sorted(set(h['round'])), 'sites': sorted(set(h.site)),\n"
            "  'train_rounds': sorted(set(h[(h.site == 'global') & (h.phase == 'train')]['round'])),\n"
            "  'points': len(again.chart_points()), 'type': type(again).__name__}))"
        )
        assert caught_up["type"] == "RunHandle"
        assert caught_up["round"] == 2, caught_up
        assert caught_up["status"] == "running", caught_up
        assert f"run {run_id}" in caught_up["header"] and f"round 2/{ROUNDS}" in caught_up["header"], caught_up
        assert ">running<" in caught_up["header"], caught_up
        assert caught_up["rounds"] == [0, 1, 2], "the rounds done before the restart must be in the view"
        assert caught_up["train_rounds"] == [1, 2], caught_up
        assert caught_up["sites"] == ["Cleveland", "Hungary", "Switzerland", "VA", "global"]
        assert caught_up["points"] > 0, "the chart must show the replayed rounds"
        assert federation.client().run(run_id)["status"] == "running"

        # -- let the run finish; the attached view follows it live -------------------------------
        opened = time.time()
        gate.open(run_id)
        final = kernel.json(
            "try:\n"
            "    again.wait(300)\n"
            "except Exception:\n"  # RunFailed or TimeoutError: the status and reason are asserted below
            "    pass\n"
            "h = again.history\n"
            "rounds_at = {e['round']: e['received'] for e in again.events if e['type'] == 'round'}\n"
            "print(json.dumps({'status': again.status, 'reason': again.reason, 'round': again.round,\n"
            "  'header': box.children[0].value, 'rounds': sorted(set(h['round'])), 'rounds_at': rounds_at,\n"
            "  'seqs': [e['seq'] for e in again.events]}))"
        )
        assert final["status"] == "completed", f"the run ended {final['status']}: {final['reason']}"
        assert final["round"] == ROUNDS
        assert f"round {ROUNDS}/{ROUNDS}" in final["header"] and ">completed<" in final["header"], final
        assert final["rounds"] == list(range(ROUNDS + 1))
        rounds_at = {int(k): v for k, v in final["rounds_at"].items()}
        assert sorted(rounds_at) == list(range(1, ROUNDS + 1)), rounds_at
        assert rounds_at[1] < opened and rounds_at[2] < opened, "rounds 1-2 must come from the replay"
        assert rounds_at[3] > opened and rounds_at[4] > opened, "rounds 3-4 must arrive live, after the gate"
        stored = coordinator_events(federation, run_id)
        assert final["seqs"] == [e["seq"] for e in stored], "the attached view must hold every event, in order"
        model = kernel.json(
            "again.wait()\n"
            "print(json.dumps({'shapes': {k: list(v.shape) for k, v in again.model.state_dict().items()},\n"
            "  'sha': again.record['model_sha256']}))"
        )
        assert model["shapes"] == {"weight": [1, 3], "bias": [1]}
        assert len(model["sha"]) == 64
