"""Code approval at the sites, end to end: real site agents whose admins must approve each task's code.

A run waits ("waiting for approval at <site>") until every site's admin runs `flip-site approve`,
then goes on by itself; a rerun of the same source needs no new approval; a rejection reaches the
researcher with the site's reason; every decision is in the site's audit log, and the chain holds.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flip_core.errors import RunFailed
from flip_core.util import wait_until
from flip_magics.client import FlipClient, RunHandle

from helpers import TINY_CELL, local_federation

BIN = Path(sys.executable).parent
SITES = ("Cleveland", "Hungary")  # two hospitals, each with its own admin


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlipClient, Path]]:
    with local_federation(
        tmp_path_factory.mktemp("flip-strict"), auto_approve=False, warm=False, sites=len(SITES)
    ) as connection:
        yield FlipClient(connection["coordinator_url"], connection["token"]), Path(connection["federation"]) / "sites"


def flip_site(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "flip-site"), *args], capture_output=True, text=True, timeout=60)


def waiting_sites(handle: RunHandle) -> set[str]:
    return {e["site"] for e in list(handle.events) if e.get("status") == "waiting-approval"}


def pending_hash(site_dir: Path) -> str:
    listed = flip_site("requests", str(site_dir))
    assert listed.returncode == 0, listed.stderr
    return listed.stdout.split()[0]


def test_a_task_waits_for_every_sites_approval_then_runs_and_reruns_need_none(strict) -> None:
    client, sites = strict
    handle = client.train(TINY_CELL, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=0, name="approval")
    assert wait_until(lambda: waiting_sites(handle) == set(SITES), 120, 0.05), list(handle.events)
    details = {e["site"]: e["detail"] for e in list(handle.events) if e.get("status") == "waiting-approval"}
    assert details == {s: f"waiting for approval at {s}" for s in SITES}
    assert handle.status == "running"

    listed = flip_site("requests", str(sites / "Hungary"))
    assert "def train(model, data, config):" in listed.stdout  # the admin reads the source itself
    assert "project default, researcher" in listed.stdout and "dataset heart-disease" in listed.stdout
    code_hash = listed.stdout.split()[0]
    assert code_hash.startswith("sha256:") and len(code_hash) == 71
    for site in SITES:
        approved = flip_site("approve", str(sites / site), code_hash[:19])  # a unique prefix will do
        assert approved.returncode == 0, approved.stderr
        assert f"approved {code_hash} for project default at {site}" in approved.stdout
    handle.wait(120)
    assert handle.status == "completed", handle.reason
    assert {e["site"] for e in list(handle.events) if e.get("status") == "ready"} == set(SITES)

    rerun = client.train(TINY_CELL, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=1, name="rerun").wait(
        120
    )
    assert rerun.status == "completed", rerun.reason
    assert waiting_sites(rerun) == set()  # approving once covers reruns of the same source

    for site in SITES:
        verified = flip_site("audit", "verify", str(sites / site))
        assert verified.returncode == 0 and "intact" in verified.stdout, verified.stdout
    shown = flip_site("audit", "show", str(sites / "Hungary")).stdout
    assert "verdict=pending" in shown and "answer=approved" in shown and "verdict=allow" in shown


def test_a_rejection_reaches_the_researcher_with_the_sites_reason(strict) -> None:
    client, sites = strict
    source = TINY_CELL + "\n# reads one more column\n"
    handle = client.train(source, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=0, name="rejected")
    assert wait_until(lambda: waiting_sites(handle) == set(SITES), 120, 0.05), list(handle.events)
    code_hash = pending_hash(sites / "Hungary")
    rejected = flip_site("reject", str(sites / "Hungary"), code_hash, "--reason", "the thalach column is not released")
    assert rejected.returncode == 0, rejected.stderr
    with pytest.raises(RunFailed) as failed:
        handle.wait(120)
    refusal = f"Hungary rejected this code ({code_hash[:19]}): the thalach column is not released"
    assert f"Hungary: refused by the site: {refusal}" in str(failed.value)
    assert "answer=rejected" in flip_site("audit", "show", str(sites / "Hungary")).stdout


def test_an_admin_command_on_an_unknown_hash_says_so(strict) -> None:
    _, sites = strict
    answer = flip_site("approve", str(sites / "Hungary"), "sha256:0123")
    assert answer.returncode == 2
    assert "no pending task has code hash sha256:0123" in answer.stderr
