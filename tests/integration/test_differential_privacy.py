"""Differential privacy end to end: sites that demand it, runs that ask for it, a budget that runs out.

Four real site agents whose policy requires DP for project ``default`` with a budget of epsilon
2.5 each. A run without ``--dp-epsilon`` is refused by every site; a run with epsilon 2 over two
rounds completes, its notebook history shows the epsilon spent after each round and no metric
computed on a site's data; a second such run would take the project past its budget and every
site refuses it with the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flip_core.errors import Rejected, RunFailed
from flip_magics.client import FlipClient

from helpers import TINY_CELL, local_federation

SITES = ("Cleveland", "Hungary")  # two hospitals: each spends its own budget
POLICY = {
    "policy": {"disclosure_threshold": 10},
    "projects": {
        "default": {
            "approved": True,
            "researchers": ["*"],
            "datasets": ["*"],
            "auto_approve": True,
            "dp_required": True,
            "max_epsilon": 2.5,
        }
    },
}


@dataclass(frozen=True)
class PrivateFederation:
    """A local federation of SITES whose policy demands differential privacy: a researcher's client, and the
    folder of the site agents' folders (their privacy ledgers)."""

    client: FlipClient
    sites: Path


@pytest.fixture(scope="module")
def private_federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateFederation]:
    with local_federation(
        tmp_path_factory.mktemp("flip-dp"), policy=POLICY, warm=False, sites=len(SITES)
    ) as connection:
        client = FlipClient(connection["coordinator_url"], connection["token"])
        yield PrivateFederation(client, Path(connection["federation"]) / "sites")


def test_sites_that_demand_privacy_refuse_a_run_without_it(private_federation: PrivateFederation) -> None:
    client = private_federation.client
    with pytest.raises(RunFailed) as failed:
        client.train(TINY_CELL, dataset="heart-disease", rounds=1, name="no-dp").wait(120)
    for site in SITES:
        assert (
            f"{site}: refused by the site: {site} requires differential privacy for project 'default' "
            "(set --dp-epsilon, at most 2.5)" in failed.value.reason
        )


def test_a_private_run_shows_its_epsilon_per_round_and_the_budget_runs_out(
    private_federation: PrivateFederation,
) -> None:
    client, sites = private_federation.client, private_federation.sites
    handle = client.train(TINY_CELL, dataset="heart-disease", rounds=2, name="dp", dp_epsilon=2.0, dp_clip=0.5)
    handle.wait(180)
    history = handle.history
    spent = history[(history.site == "global") & (history.phase == "privacy")]
    assert spent["round"].tolist() == [1, 2]
    first, second = spent["value"].tolist()
    assert 0 < first < second <= 2.0 and second > 1.9  # the whole run spends (almost exactly) what it asked
    assert set(history.phase) == {"privacy"}  # no loss, accuracy or count computed on a site's data left
    labels = {label for label, *_ in handle.chart_points()}  # the notebook's live chart: privacy panels only
    assert labels == {"privacy epsilon", "privacy project_epsilon"}, labels
    assert handle.record["epsilon_spent"]["global"] == second  # the run record keeps what was spent
    assert {k: handle.record["config"][k] for k in ("dp_epsilon", "dp_clip", "dp_rounds")} == {
        "dp_epsilon": 2.0,
        "dp_clip": 0.5,
        "dp_rounds": 2,
    }  # and the run record keeps the settings
    assert {row["site"] for row in handle.site_rows() if row["samples"] is None} == set(SITES)
    assert handle.model is not None  # the noised global model comes back

    for site in SITES:
        ledger = json.loads((sites / site / "privacy" / "default.json").read_text())
        assert [(r["run"], r["round"]) for r in ledger["releases"]] == [(handle.run_id, 1), (handle.run_id, 2)]
        shown = subprocess.run(
            [str(Path(sys.executable).parent / "flip-site"), "audit", "show", str(sites / site)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert "noise_multiplier" in shown

    again = client.train(TINY_CELL, dataset="heart-disease", rounds=2, name="dp-again", dp_epsilon=2.0)
    with pytest.raises(RunFailed) as failed:
        again.wait(120)
    for site in SITES:
        assert (
            f"{site}: refused by the site: the privacy budget of project 'default' at {site} is exhausted: "
            "epsilon 2 of 2.5 spent; this task (--dp-epsilon 2) would bring it to 2.9"
        ) in failed.value.reason


def test_privacy_settings_are_checked_before_the_run_starts(private_federation: PrivateFederation) -> None:
    client = private_federation.client
    for options, message in [
        ({"dp_epsilon": -1.0}, "--dp-epsilon must be above 0"),
        ({"dp_clip": 1.0}, "--dp-clip needs --dp-epsilon"),
        ({"dp_epsilon": 1.0, "config": {"dp_epsilon": 50}}, "--config dp_epsilon is reserved"),
    ]:
        with pytest.raises(Rejected, match=message):
            client.train(TINY_CELL, dataset="heart-disease", rounds=1, **options)
