"""Attacks on a project whose queries the sites answer under differential privacy (``query_epsilon`` 1, a budget of
four): every answer is fresh noise, so the researcher asks again and again to average it away, and differences two
cohorts one patient apart, which the ledger does not refuse here (a refusal that depends on the data would be a
release the budget does not count). The budget ends it: after four queries, whatever they asked, every site refuses
in a sentence with the figures, and what came back before was epsilon-DP in all (4 at most, per site)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from coordinator.config import add_token
from flip_magics.client import FlipClient
from site_agent.data.catalog import load_site
from site_agent.data.formats import load_table

from kit import PRIVATE_PROJECT, PRIVATE_QUERIES, SITES, RedTeam

pytestmark = pytest.mark.integration

DATASET = "heart-disease"
SITE = SITES[0]
RESEARCHER = "eve"  # a researcher of this module's own: the ledger keeps each researcher's answers apart


@pytest.fixture(scope="module")
def truth(redteam: RedTeam) -> pd.DataFrame:
    return load_table(load_site(Path(redteam.sites_dir) / SITE), DATASET)


def test_averaging_fresh_noise_and_differencing_end_at_the_budget(redteam, truth) -> None:
    token = add_token(Path(redteam.connection["federation"]) / "coordinator.json", RESEARCHER, PRIVATE_PROJECT)
    private = FlipClient(redteam.connection["coordinator_url"], token)
    # stats ask for the bounds to clamp to before they spend anything
    unbounded = private.query(DATASET, "stats", ["age"])
    assert "range=(LOW, HIGH)" in unbounded.refused[SITE]
    patient = truth[truth.age > 60].iloc[0]
    one_out = f"age > 60 and not (age = {patient.age:g} and chol = {patient.chol:g} and thalach = {patient.thalach:g})"
    results = [private.query(DATASET, "count", where=where) for where in ["age > 60", one_out] * 3]
    told = [r.totals.get(SITE) for r in results if SITE not in r.refused]
    assert len(told) == PRIVATE_QUERIES  # the budget's worth (the noisy total of a cohort this size is told), ...
    for refused in results[PRIVATE_QUERIES:]:  # ... and nothing after it, in a sentence with the figures
        why = refused.refused[SITE]
        assert "privacy budget of project 'private'" in why and f"epsilon 4 of {PRIVATE_QUERIES} spent" in why, why
    notes = " ".join(results[0].notes)
    assert f"{SITE} answered under differential privacy (epsilon 1 per query)" in notes
    assert f"1 of {PRIVATE_QUERIES} spent" in notes
