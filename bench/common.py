"""Shared pieces of the benchmarks: the machine, process CPU, SuperLink call counts, the model cell."""

from __future__ import annotations

import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
ACCESS_LINE = re.compile(r'"(?:GET|POST|PUT) (/v1/[a-z-]+/[a-z-]+)')


def machine() -> str:
    cores = os.cpu_count()
    memory = psutil.virtual_memory().total / 2**30
    cpu = platform.processor() or platform.machine()
    system = f"{platform.system()} {platform.release()}"
    return f"{cores} cores ({cpu}), {memory:.0f} GiB, {system}, Python {platform.python_version()}"


def cpu_seconds(pid: int) -> float:
    """User+system CPU of one process (not its children)."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def count_calls(log: Path, start_offset: int) -> tuple[int, dict[str, int]]:
    """SuperLink API calls logged after byte ``start_offset`` of its access log: total and by route."""
    with open(log, "rb") as fh:
        fh.seek(start_offset)
        text = fh.read().decode(errors="replace")
    by_route: dict[str, int] = {}
    for match in ACCESS_LINE.finditer(text):
        by_route[match.group(1)] = by_route.get(match.group(1), 0) + 1
    return sum(by_route.values()), by_route


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# The quickstart's preprocessing (FLamby's Fed-Heart-Disease features) and test accuracy: every benchmark cell's start.
HEART_COMMON = """
import torch

NUMERIC = ["age", "sex", "trestbps", "chol", "fbs", "thalach", "exang", "oldpeak"]


def features(df, stats=None):
    df = df.drop(columns=["slope", "ca", "thal"]).dropna()
    X = df[NUMERIC].astype("float32")
    for level in (2, 3, 4):
        X[f"cp_{level}"] = (df["cp"] == level).astype("float32")
    for level in (1, 2):
        X[f"restecg_{level}"] = (df["restecg"] == level).astype("float32")
    y = (df["num"] > 0).astype("float32").to_numpy()
    if stats is None:
        stats = (X.mean(), X.std().replace(0, 1))
    X = ((X - stats[0]) / stats[1]).fillna(0.0)
    return torch.tensor(X.to_numpy(), dtype=torch.float32), torch.tensor(y), stats


def evaluate(model, data, config):
    _, _, stats = features(data.train)
    X, y, _ = features(data.test, stats)
    model.eval()
    with torch.no_grad():
        logits = model(X).squeeze(1)
        return {"accuracy": ((logits > 0).float() == y).float().mean().item()}
"""

# The quickstart's model, shared by the stock Flower app and FLIP's cell.
HEART_CODE = (
    HEART_COMMON
    + """

def build_model():
    return torch.nn.Linear(13, 1)


def train(model, data, config):
    X, y, _ = features(data.train)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(100):
        batch = torch.randint(0, len(y), (4,))
        optimizer.zero_grad()
        loss = loss_fn(model(X[batch]).squeeze(1), y[batch])
        loss.backward()
        optimizer.step()
    return {"loss": float(loss), "num_examples": len(y)}

"""
)


def default_front() -> str:
    """The fleet front the benchmarks put sites behind: nginx where it is installed (the faster one,
    ``bench.model_size --front``), else FLIP's own."""
    from coordinator.nginx_front import nginx_binary

    try:
        nginx_binary()
    except FileNotFoundError:
        return "python"
    return "nginx"


def warm_client(connection: dict[str, str]) -> Any:
    """The notebook's plain client of a federation just started, once every site's spare task process has loaded
    (torch), as a minute after `flip up`: a quiet federation to time."""
    from flip_core.util import wait_until
    from flip_magics.client import FlipClient

    client = FlipClient(connection["coordinator_url"], connection["token"])
    if not wait_until(lambda: all(s["warm"] for s in client.sites()), 180, 0.2):
        raise RuntimeError("the sites did not warm up within 180 s")
    return client
