"""The baseline: the same model and data as a plain Flower app, run by ``flwr run`` on stock Flower.

A SuperLink and four SuperNodes with Flower's defaults (no FLIP code at all); the app uses
Flower's own FedAvg strategy. The ServerApp prints a timestamp after each round, which the
benchmark reads from ``flwr run --stream``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import HEART_CODE, count_calls, cpu_seconds
from flip_core.util import free_port, wait_until

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "stockheart"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "bench"

[tool.flwr.app.components]
serverapp = "stockheart.server:app"
clientapp = "stockheart.client:app"

[tool.flwr.app.config]
num-server-rounds = 3
"""

SERVER = """import time
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


def stamp(server_round, arrays):
    print(f"FLIPBENCH round={server_round} t={time.time():.4f}", flush=True)
    return None


@app.main()
def main(grid: Grid, context: Context) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 1)
    strategy = FedAvg(min_train_nodes=4, min_evaluate_nodes=4, min_available_nodes=4)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                   num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=stamp)
"""

CLIENT = """import pandas as pd
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from stockheart.heart import build_model, evaluate as heart_evaluate, train as heart_train

app = ClientApp()


class Data:
    def __init__(self, context):
        self.train = pd.read_csv(context.node_config["train-path"])
        self.test = pd.read_csv(context.node_config["test-path"])


def _model(msg):
    model = build_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = _model(msg)
    metrics = heart_train(model, Data(context), {})
    n = metrics.pop("num_examples")
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({**metrics, "num-examples": n})})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    data = Data(context)
    metrics = heart_evaluate(_model(msg), data, {})
    content = RecordDict({"metrics": MetricRecord({**metrics, "num-examples": len(data.test)})})
    return Message(content=content, reply_to=msg)
"""

ROUND_LINE = re.compile(r"FLIPBENCH round=(\d+) t=([\d.]+)")


@dataclass
class StockResult:
    seconds_per_round: list[float]
    calls_per_round: float
    cpu_per_round: float
    calls_by_route: dict[str, int]


def write_app(root: Path) -> Path:
    app = root / "stockheart_app"
    (app / "stockheart").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT)
    (app / "stockheart" / "__init__.py").write_text("")
    (app / "stockheart" / "heart.py").write_text(HEART_CODE)
    (app / "stockheart" / "server.py").write_text(SERVER)
    (app / "stockheart" / "client.py").write_text(CLIENT)
    return app


def run_stock(root: Path, site_splits: dict[str, tuple[Path, Path]], rounds: int) -> StockResult:
    """Start stock Flower, run the app for ``rounds`` rounds, measure, stop everything."""
    bindir = Path(sys.executable).parent
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", None)  # stock defaults
    superlink_env = {**env, "FLWR_LOG_LEVEL": "DEBUG"}  # logs every API call, so that they can be counted
    logs = root / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, cmd: list[str], proc_env: dict[str, str] = env) -> subprocess.Popen[bytes]:
        with open(logs / f"{name}.log", "wb") as sink:
            proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=proc_env, start_new_session=True)
        procs.append(proc)
        return proc

    try:
        superlink = spawn(
            "superlink",
            [
                str(bindir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--disable-runtime-dependency-installation",
            ],
            superlink_env,
        )
        for name, (train, test) in site_splits.items():
            spawn(
                f"supernode-{name}",
                [
                    str(bindir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f'train-path="{train}" test-path="{test}"',
                ],
            )
        ready = lambda: all("SuperNode ID" in (logs / f"supernode-{n}.log").read_text() for n in site_splits)  # noqa: E731
        if not wait_until(ready, 120, 0.2):
            raise RuntimeError("the stock SuperNodes did not register")
        app = write_app(root)
        log_offset = (logs / "superlink.log").stat().st_size
        cpu_before = cpu_seconds(superlink.pid)
        out = subprocess.run(
            [str(bindir / "flwr"), "run", str(app), "--stream", "--run-config", f"num-server-rounds={rounds}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        cpu = cpu_seconds(superlink.pid) - cpu_before
        calls, by_route = count_calls(logs / "superlink.log", log_offset)
        stamps = {int(m.group(1)): float(m.group(2)) for m in ROUND_LINE.finditer(out.stdout)}
        if len(stamps) != rounds + 1:
            raise RuntimeError(f"flwr run gave {len(stamps)} round stamps:\n{out.stdout[-3000:]}\n{out.stderr[-2000:]}")
        durations = [stamps[r] - stamps[r - 1] for r in range(1, rounds + 1)]
        return StockResult(durations, calls / rounds, cpu / rounds, by_route)
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
        for proc in procs:
            proc.wait()
