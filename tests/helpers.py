"""Plain helpers for the tests (no fakes: those are in tests/fakes): paths, the coordinator's config, a local
federation, and tiny real torch cells over the heart-disease table, one of them held at a gate the test opens."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip_local.eunomia import new_users

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig

REPO = Path(__file__).resolve().parents[1]


# a dataset as a site announces it (metadata only), for the coordinator's unit tests
HEART = {
    "name": "heart-disease",
    "rows": 303,
    "train_rows": 200,
    "test_rows": 103,
    "columns": [],
    "dtypes": [],
    "fingerprint": "sha256:x",
    "format": "uci-heart",
    "projects": ["heart"],  # the projects its site admits: only they see it
}


def coordinator_config(state_dir: Path, **overrides: Any) -> CoordinatorConfig:
    """A coordinator's config for a test that starts no SuperLink: state under ``state_dir``, internal token
    ``internal``, no shared site token, no API tokens; ``overrides`` set any other field."""
    from coordinator.config import CoordinatorConfig

    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "superlink_control": "unused",
        "internal_token": "internal",
        "site_token": "",
    }
    return CoordinatorConfig(state_dir=state_dir, **{**settings, **overrides})


def model_bytes(bias: float = 0.0) -> bytes:
    """A real (tiny) model as the notebook uploads it: an .npz of its state dict (``bias``: another of one size)."""
    import numpy as np

    from flip_core.codec import pack_arrays

    return pack_arrays({"weight": np.zeros((1, 3), dtype=np.float32), "bias": np.full(1, bias, dtype=np.float32)})


def flip(*args: Any, timeout: float = 600) -> Any:
    """The real ``flip`` command of this environment (FLIP_HOME names the test's federation, as set)."""
    import subprocess
    import sys

    command = [str(Path(sys.executable).parent / "flip"), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def flip_run(notebook: str, out: Path, **parameters: Any) -> dict[str, Any]:
    """``flip run notebooks/NOTEBOOK -p ...`` into ``out``; its execution.json and what it printed (``stdout``), the
    run failing the test."""
    import json

    pairs = [str(x) for name, value in parameters.items() for x in ("-p", name, value)]
    done = flip("run", REPO / "notebooks" / notebook, *pairs, "--out", out, "--no-progress")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    execution: dict[str, Any] = json.loads((out / "execution.json").read_text())
    execution["stdout"] = done.stdout  # what flip run printed (not in execution.json)
    return execution


def static_figures(notebook: Path) -> list[str]:
    """The SVG charts the runs' widgets left in an executed notebook's outputs (kept without a live frontend)."""
    import nbformat

    executed = nbformat.read(notebook, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [o["data"]["image/svg+xml"] for o in outputs if "image/svg+xml" in o.get("data", {})]


def shared_data() -> Path:
    return Path(os.environ.get("FLIP_DATA_DIR") or REPO.parent / "shared" / "data")


def heart_tables(names: tuple[str, ...] = ("cleveland", "hungarian", "switzerland", "va")) -> dict[str, Any]:
    """The real UCI heart-disease tables as pandas reads them at the sites, by file name."""
    import pytest

    from site_agent.data.formats import read_table

    paths = {name: shared_data() / "heart-disease" / f"processed.{name}.data" for name in names}
    if absent := [str(p) for p in paths.values() if not p.is_file()]:
        pytest.fail(f"the UCI heart-disease tables are missing ({', '.join(absent)}); set FLIP_DATA_DIR")
    return {name: read_table(path, "uci-heart") for name, path in paths.items()}


@contextlib.contextmanager
def local_federation(home: Path, **options: Any) -> Iterator[dict[str, Any]]:
    """``flip up`` under ``home`` with ``options`` (real processes), FLIP_HOME pointing there meanwhile
    so that kernels and CLIs a test starts find its connection file; ``flip down`` after."""
    from flip_local.federation import down, up

    previous = os.environ.get("FLIP_HOME")
    os.environ["FLIP_HOME"] = str(home)
    try:
        yield up(home, **options)
    finally:
        down(home)
        if previous is None:
            os.environ.pop("FLIP_HOME", None)
        else:
            os.environ["FLIP_HOME"] = previous


TINY_CELL = """
import torch

def build_model():
    return torch.nn.Linear(3, 1)

def _xy(df):
    X = torch.tensor(df[["age", "trestbps", "thalach"]].fillna(0).to_numpy(), dtype=torch.float32) / 100
    y = torch.tensor((df["num"] > 0).to_numpy(), dtype=torch.float32)
    return X, y

def train(model, data, config):
    X, y = _xy(data.train)
    opt = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1))
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(X).squeeze(1), y)
        loss.backward()
        opt.step()
    return {"loss": loss.item()}

def evaluate(model, data, config):
    X, y = _xy(data.test)
    with torch.no_grad():
        acc = ((model(X).squeeze(1) > 0).float() == y).float().mean().item()
    return {"accuracy": acc, "rows": len(y)}
"""

# a MONAI cell over an imaging dataset's cases (data.cached, as at a site) with a linear model over every pixel:
# image_cell(28 * 28) fits BreastMNIST; another size fails at EVAL_LINE with torch's "mat1 and mat2 shapes cannot be
# multiplied", in evaluate() (the first function a run calls)
EVAL_LINE = "        scores = model(images).squeeze(1)"


def image_cell(features: int) -> str:
    return f"""
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

transform = Compose([LoadImaged(keys="image"), EnsureChannelFirstd(keys="image"), ScaleIntensityd(keys="image")])

def build_model():
    return torch.nn.Linear({features}, 1)

def batch(data, part):
    cases = data.cached(part, transform)
    images = torch.stack([torch.as_tensor(item["image"]).reshape(-1) for item in cases])
    labels = torch.tensor([float(item["label"]) for item in cases])
    return images.to(data.device), labels

def train(model, data, config):
    images, labels = batch(data, "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(images).squeeze(1), labels)
    opt.zero_grad(); loss.backward(); opt.step()
    return {{"loss": loss.item(), "pixels": images.shape[1]}}

def evaluate(model, data, config):
    images, labels = batch(data, "test")
    with torch.no_grad():
{EVAL_LINE}
    return {{"accuracy": ((scores > 0).float() == labels).float().mean().item(), "cases": len(labels)}}
"""


# TINY_CELL whose train() first pauses: config "pause" everywhere, "pause_<SITE>" at one site
# (the workload of a slow site, not a synchronisation).
PAUSING_CELL = (
    TINY_CELL
    + """
import time

_train = train

def train(model, data, config):
    time.sleep(config.get("pause_" + data.site, config.get("pause", 0)))
    return _train(model, data, config)
"""
)

# TINY_CELL whose train() waits at a gate the test holds (Gate below): from round config "hold_from" (1 unless
# set), at the site config "hold_at" names (every site unless set). That is the workload of a held site, which
# keeps a run provably unfinished while the test looks at it, not synchronisation of the test.
GATED_CELL = (
    TINY_CELL
    + """
import os
import time

_train_ungated = train

def train(model, data, config):
    if data.round >= config.get("hold_from", 1) and config.get("hold_at", data.site) == data.site:
        deadline = time.monotonic() + 300
        while not os.path.exists("gate-open"):  # in its working folder: the run's scratch at this site
            if time.monotonic() > deadline:
                raise TimeoutError("the gate was never opened")
            time.sleep(0.05)
    return _train_ungated(model, data, config)
"""
)


class Gate:
    """Where GATED_CELL's train() waits: a file the test puts in a site's scratch folder for the run (the one
    place a task process writes), as the task process sees it: a sandboxed one's scratch is a tmpfs of its own,
    reached from outside through ``/proc/PID/root`` (the tests run as root). Not a fake: the real sites run the
    real cell."""

    def __init__(self, sites: Path) -> None:
        self.sites = sites  # the federation's site folders

    def open(self, run_id: str, *names: str, seconds: float = 180) -> None:
        """Open the gate of run ``run_id`` at the sites ``names`` (every site if none), once each holds the run."""
        from flip_core.util import wait_until

        chosen = names or tuple(sorted(p.name for p in self.sites.iterdir()))
        folders = [self.sites / name / "scratch" / f"run-{run_id}" for name in chosen]
        assert folders and wait_until(lambda: all(self._seen(f) for f in folders), seconds, 0.1), (
            f"after {seconds:.0f} s not every site holds the run's scratch: {[f for f in folders if not self._seen(f)]}"
        )
        for folder in folders:
            for seen in self._seen(folder):
                (seen / "gate-open").write_text("go")

    @staticmethod
    def _seen(folder: Path) -> list[Path]:
        """``folder`` as the task processes of its site see it. A sandboxed task process is PID 1 of a PID namespace
        of its own, with the site's scratch folder a tmpfs of its own, reached through its root; the agent makes the
        run's folder on the host before the task process makes its own there, so where the site sandboxes, only the
        sandboxed processes' views count (a gate opened in the host's folder would never be seen by the task);
        where it does not, the host's folder is the task's."""
        scratch = str(folder.parent).lstrip("/")
        views, sandboxed = [], False
        for entry in Path("/proc").iterdir():
            try:
                nested = entry.name.isdigit() and any(
                    line.startswith("NSpid:") and len(line.split()) > 2
                    for line in (entry / "status").read_text().splitlines()
                )
                if not nested or not (entry / "root" / scratch).is_dir():
                    continue
            except OSError:
                continue
            sandboxed = True  # a task process of this site, in its sandbox
            view = entry / "root" / str(folder).lstrip("/")
            if view.is_dir():
                views.append(view)
        return views if sandboxed or not folder.is_dir() else [folder]


# -- OMOP: the session's PostgreSQL with Eunomia's three hospitals (conftest.omop) --------------------------------
# new users of celecoxib (its first exposure, 365 days observed before it): the Eunomia study's target cohort
CELECOXIB: dict[str, Any] = new_users([(1118084, "celecoxib")])


def omop_source(omop: dict[str, Any], site: str, **changes: Any) -> Path:
    """A source file of ``site``'s database (``omop``: conftest's fixture), as its admin writes it, with ``changes``."""
    database = omop["databases"][site]
    return database.write_source(omop["server"], omop["home"] / f"{site}-{len(changes)}.toml", **changes)


def omop_site(omop: dict[str, Any], name: str, folder: Path, **changes: Any) -> Any:
    """A site registering its database with the real CLI, admitting project "study" to it; its query service.
    ``changes``: to the database's source file (written in ``folder``, the site's own), e.g. its statement timeout."""
    import subprocess
    import sys

    from site_agent.data.catalog import init_site, load_site, write_policy
    from site_agent.governance.gate import Governance
    from site_agent.queries.cohorts import CohortStore
    from site_agent.queries.service import QueryService

    site_dir = folder / name
    init_site(site_dir, name)
    flip_site = Path(sys.executable).parent / "flip-site"
    if changes:
        source = omop["databases"][name].write_source(omop["server"], folder / f"{name}.source.toml", **changes)
    else:
        source = omop_source(omop, name)
    added = subprocess.run(
        [flip_site, "dataset", "add", site_dir, "gibleed", source, "--format", "omop"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    site = load_site(site_dir)
    project = {"approved": True, "researchers": ["*"], "datasets": ["*"], "tasks": ["train", "query"]}
    write_policy(site, {"projects": {"study": project}})
    return QueryService(site, Governance(site), CohortStore(site.root))
