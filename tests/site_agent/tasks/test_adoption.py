"""A run's task process is given what the run was approved for when the run adopts it, and nothing before
(``site_agent.tasks.adoption``): the run's own rows, its site as one dataset, a process of its own."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flip_core.cell import source_hash
from flip_core.protocol import StepRequest, decode_result, encode_request
from flip_core.status import Phase, StepStatus
from site_agent.data.catalog import CatalogError, Handed, SiteConfig, init_site
from site_agent.data.formats import add_dataset, handed
from site_agent.governance.audit import read_records
from site_agent.tasks import service
from site_agent.tasks.adoption import Adoption, binding, bound_files, run_site, untold
from site_agent.tasks.runner import HandedRun, TaskSession
from site_agent.tasks.worker import ONE_RUN

from fakes import FakeTaskProcess, FakeZygote

COUNTING_CELL = """
import torch

def build_model():
    return torch.nn.Linear(1, 1)

def train(model, data, config):
    return {"loss": float(data.train["marker"].sum() + data.test["marker"].sum())}

def evaluate(model, data, config):
    return {}
"""
PARAMS = {"weight": np.zeros((1, 1), dtype=np.float32), "bias": np.zeros((1,), dtype=np.float32)}
COHORT = [2, 3, 5, 7, 11, 13, 17, 19]


@pytest.fixture
def site(tmp_path: Path) -> SiteConfig:
    """Two tables: ``marked`` (marker i + 1 on row i) and ``other``."""
    marked, other = tmp_path / "marked.csv", tmp_path / "other.csv"
    marked.write_text("marker\n" + "".join(f"{i + 1}\n" for i in range(24)))
    other.write_text("marker\n" + "".join(f"{1000 + i}\n" for i in range(24)))
    config = add_dataset(init_site(tmp_path / "site", "A"), "marked", marked, "csv")
    return add_dataset(config, "other", other, "csv")


def request(dataset: str = "marked", cohort: str = "", run_id: str = "r1", round_: int = 1) -> StepRequest:
    return StepRequest(
        run_id=run_id,
        source=COUNTING_CELL,
        source_hash=source_hash(COUNTING_CELL),
        dataset=dataset,
        project="p",
        researcher="alice",
        seed=0,
        round=round_,
        phase=Phase.FIT,
        config={},
        params=PARAMS,
        cohort=cohort,
    )


def test_a_run_is_told_its_own_dataset_without_its_paths_and_no_other(site: SiteConfig) -> None:
    entry = site.datasets["marked"]
    settings = Adoption("A", entry, "older", Handed(b"")).settings()
    assert entry.path not in str(settings) and settings["cohort"] == "older"
    known = run_site(site.root, settings)
    assert known.name == "A" and list(known.datasets) == ["marked"]  # not "other"
    assert known.datasets["marked"] == untold(entry)
    assert untold(entry) == replace(entry, path="", source="", rows=0, train_rows=0, test_rows=0)  # what it may know
    assert run_site(site.root, Adoption("A", None, "", Handed(b"")).settings()).datasets == {}


def test_the_files_a_run_binds_reach_its_process_in_a_sealed_list(tmp_path: Path) -> None:
    assert binding(()) == ([], []) and bound_files(None) == []  # a spare: nothing
    files = (tmp_path / "case0.npz", tmp_path / "case 1.npz")
    arguments, descriptors = binding(files)
    assert arguments == ["--bind-fd", str(descriptors[0])]
    assert bound_files(descriptors[0]) == list(files)
    with pytest.raises(OSError):
        os.fstat(descriptors[0])  # read once, closed


def test_a_task_session_reads_only_the_rows_it_was_handed(site: SiteConfig) -> None:
    payload = handed(site, "marked", COHORT).payload
    known = run_site(site.root, Adoption("A", site.datasets["marked"], "older", Handed(b"")).settings())
    session = TaskSession(known, handed=HandedRun("marked", "older", payload))
    result = session.step(request(cohort="older"))
    assert result.status == StepStatus.OK, result
    assert result.train_metrics["loss"] == sum(i + 1 for i in COHORT)  # the cohort's rows, every one, no other
    assert session.handed is not None and session.handed.payload == b""  # its bytes dropped once read
    assert session.step(request(cohort="older", round_=2)).train_metrics == result.train_metrics  # read once, kept
    assert session.step(request(cohort="")).status == StepStatus.ERROR  # the whole table: never handed
    assert session.step(request(dataset="other")).status == StepStatus.NO_DATASET  # another dataset: not its site's


def test_a_spare_goes_to_one_run_only_and_a_run_that_binds_files_gets_a_process_of_its_own(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "Worker", FakeTaskProcess)
    monkeypatch.setattr(service, "Zygote", FakeZygote)
    tasks = service.TaskService("A", site.root, warm_seconds=60)
    tasks.warm_up()
    spare = tasks.spare
    assert isinstance(spare, FakeTaskProcess) and spare.bind == ()

    def adoption(files: tuple[Path, ...] = ()) -> Adoption:
        return Adoption("A", site.datasets["marked"], "", Handed(b"rows", files))

    for run_id in ("r1", "r2"):
        reply = tasks.step(encode_request(request(run_id=run_id)), adoption=adoption)
        assert decode_result(reply).status == StepStatus.OK
    first, second = tasks.workers["r1"], tasks.workers["r2"]
    assert first is spare and second is not spare and tasks.spare is None
    assert [a[0] for a in first.adoptions] == ["r1"] and [a[0] for a in second.adoptions] == ["r2"]
    tasks.step(encode_request(request(run_id="r1", round_=2)), adoption=adoption)
    assert len(first.adoptions) == 1  # its later steps: the same process, not adopted again

    tasks.warm_up()
    ready = tasks.spare
    scans = (site.root / "case0.npz",)
    tasks.step(encode_request(request(run_id="r3")), adoption=lambda: adoption(scans))
    own = tasks.workers["r3"]
    assert own is not ready and own.bind == scans and tasks.spare is ready


def test_a_run_past_the_sites_runs_limit_is_refused_in_its_sentence_and_audited(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "Worker", FakeTaskProcess)
    monkeypatch.setattr(service, "Zygote", FakeZygote)
    tasks = service.TaskService("A", site.root, warm_seconds=60, limits=replace(service.DEFAULT_LIMITS, runs_limit=2))

    def adoption() -> Adoption:
        return Adoption("A", site.datasets["marked"], "", Handed(b"rows"))

    for run_id in ("r1", "r2"):  # two runs hold a task process each, between their rounds
        assert decode_result(tasks.step(encode_request(request(run_id=run_id)), adoption=adoption)).status == "ok"
    refused = decode_result(tasks.step(encode_request(request(run_id="r3")), adoption=adoption))
    sentence = "the site agent (A runs at most 2 runs at once: not this one now)"
    assert (refused.status, refused.error_type, refused.error_where) == (StepStatus.ERROR, "RunLimit", sentence)
    assert set(tasks.workers) == {"r1", "r2"}  # no process was started or adopted for it
    assert decode_result(tasks.step(encode_request(request(run_id="r1", round_=2)))).status == "ok"  # theirs go on
    limits = [r for r in read_records(site.root) if r["kind"] == "limit"]
    assert [(r["run"], r["limit"], r["setting"]) for r in limits] == [("r3", "runs", 2)]
    tasks._retire("r1")  # a run ends here: its place is free
    assert decode_result(tasks.step(encode_request(request(run_id="r3")), adoption=adoption)).status == "ok"


def test_data_that_cannot_be_handed_fails_the_step_before_any_process_is_chosen(
    site: SiteConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "Worker", FakeTaskProcess)
    monkeypatch.setattr(service, "Zygote", FakeZygote)
    tasks = service.TaskService("A", site.root, warm_seconds=60)
    tasks.warm_up()

    def changed() -> Adoption:
        raise CatalogError("dataset 'marked' at site 'A' changed since it was registered")

    failed = decode_result(tasks.step(encode_request(request()), adoption=changed))
    assert (failed.status, failed.error_type) == (StepStatus.ERROR, "DatasetUnavailable")
    assert "changed" not in failed.error_where  # the site's own sentence stays in its log
    assert tasks.workers == {} and tasks.spare is not None and tasks.spare.adoptions == []


def test_a_task_process_trains_on_the_rows_it_was_handed_and_refuses_a_second_run(site: SiteConfig) -> None:
    """A real task process (sandboxed, torch loaded): adopted, it trains on the rows handed to it, sealed in memory;
    asked to take a second run, it refuses and ends."""
    trains_on_its_rows_then_refuses_a_second_run(service.Worker(site.root), site)


def trains_on_its_rows_then_refuses_a_second_run(worker: service.Worker, site: SiteConfig) -> None:
    """What a real task process does once adopted, however it was started (anew, or forked from the zygote)."""
    try:
        worker.wait_ready()
        run = Adoption("A", site.datasets["marked"], "older", handed(site, "marked", COHORT))
        scratch = site.root / "scratch" / "run-r1"
        scratch.mkdir(parents=True)
        worker.adopt("r1", scratch, None, run)
        result = decode_result(worker.call(encode_request(request(cohort="older")), 120))
        assert result.status == StepStatus.OK, result
        assert result.train_metrics["loss"] == sum(i + 1 for i in COHORT)
        with pytest.raises((EOFError, OSError)):
            worker.adopt("r2", scratch, None, run)
        assert worker.process.wait(30) == ONE_RUN
    finally:
        worker.kill()
