"""Survival across the real federation (issue 29): ACTG 175 (Hammer et al. 1996, an HIV trial of 2139 patients in
four arms, bundled with lifelines) split by row across the four demo sites as a dataset of each, the notebook's
client, the hub's survival desk, the query line, the site agents. The reference is lifelines on the pooled rows."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

from flip_core.errors import Rejected, RequestInvalid
from flip_core.survival import binned_times
from flip_core.util import wait_until
from flip_local.federation import restart
from flip_local.sites import HEART_SITES
from site_agent.data.catalog import load_site
from site_agent.data.formats import add_dataset
from site_agent.queries.cox import kept_bins

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::DeprecationWarning")]
EDGES = [180.0, 360.0, 540.0, 720.0, 900.0, 1080.0, 1260.0]  # days; follow-up ends by day 1231
COLUMNS = ["days", "cens", "arms", "treat", "age", "gender", "karnof"]
# lifelines converged further than its defaults (which stop 4e-6 short on ACTG 175's arms): the maximum itself
TIGHT = {"precision": 1e-12, "r_precision": 1e-14}


@pytest.fixture(scope="module")
def actg(federation) -> dict[str, pd.DataFrame]:
    """Each site's share of ACTG 175 (every fourth row), registered as ``actg175`` and the agents restarted."""
    table = pd.read_csv(resources.files("lifelines") / "datasets" / "ACTG175.csv")[COLUMNS]
    parts = {site: table.iloc[i::4].reset_index(drop=True) for i, site in enumerate(sorted(HEART_SITES))}
    for site, part in parts.items():
        site_dir = federation.home / "federation" / "sites" / site
        part.to_csv(site_dir / "actg175.csv", index=False)
        add_dataset(load_site(site_dir), "actg175", site_dir / "actg175.csv", "csv")
        restart(f"site-{site}", federation.home)
    client = federation.client()

    def online() -> bool:
        return all(s["status"] == "online" and "actg175" in {d["name"] for d in s["datasets"]} for s in client.sites())

    assert wait_until(online, 120, 0.2)
    return parts


def test_kaplan_meier_by_treatment_is_lifelines_on_the_binned_times_with_the_log_rank(federation, actg) -> None:
    result = federation.client().km("actg175", "days", "cens", EDGES, group="treat")
    assert result.refused == {} and sorted(result.sites["site"]) == sorted(actg)
    pooled = pd.concat(actg.values(), ignore_index=True)
    kept = result.raw["kept_edges"]
    times, events = binned_times(pooled["days"].to_numpy(), pooled["cens"].to_numpy(), kept)
    for level, rows in (("0", pooled["treat"] == 0), ("1", pooled["treat"] == 1)):
        mine = result.curves[result.curves["group"] == level]
        reference = KaplanMeierFitter().fit(times[rows], events[rows])
        expected = reference.survival_function_at_times(mine["time"]).to_numpy()
        np.testing.assert_allclose(mine["survival"].to_numpy(), expected, atol=1e-9)
        band = reference.confidence_interval_.loc[mine["time"]].to_numpy()
        np.testing.assert_allclose(mine[["ci_low", "ci_high"]].to_numpy(), band, atol=1e-9)
    test = multivariate_logrank_test(times, pooled["treat"], events)
    assert result.logrank["statistic"] == pytest.approx(test.test_statistic, rel=1e-9)
    assert result.logrank["p"] == pytest.approx(test.p_value, rel=1e-6)


def test_a_stratified_and_a_binned_cox_model_are_lifelines_fits_and_bad_input_is_refused(federation, actg) -> None:
    client = federation.client()
    pooled = pd.concat([part.assign(site=site) for site, part in actg.items()], ignore_index=True)
    dummies = pooled.assign(**{f"arm{a}": (pooled["arms"] == a).astype(float) for a in (1, 2, 3)})
    columns = ["days", "cens", "age", "karnof", "arm1", "arm2", "arm3"]
    result = client.cox("age + karnof + C(arms)", "actg175", "days", "cens")
    assert result.refused == {} and result.iterations < 15
    reference = CoxPHFitter().fit(dummies[[*columns, "site"]], "days", "cens", strata=["site"], fit_options=TIGHT)
    mine = result.coefficients.set_index("name")
    np.testing.assert_allclose(mine["estimate"].to_numpy(), reference.params_.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(mine["se"].to_numpy(), reference.standard_errors_.to_numpy(), rtol=1e-6)
    assert list(mine.index) == ["age", "karnof", "C(arms)[T.1]", "C(arms)[T.2]", "C(arms)[T.3]"]
    binned = client.cox("age + treat", "actg175", "days", "cens", binned=True, edges=EDGES)
    each = []  # every row's time binned at its own site's kept edges (the sites' own rule, run here on their parts)
    for part in actg.values():
        x = part[["age", "treat"]].to_numpy(dtype=float)
        kept = [EDGES[k] for k in kept_bins(part["days"].to_numpy(), part["cens"].to_numpy() == 1, x, EDGES, 10)]
        t, e = binned_times(part["days"].to_numpy(), part["cens"].to_numpy(), kept)
        each.append(part.assign(days=t, cens=e.astype(int))[["days", "cens", "age", "treat"]])
    reference = CoxPHFitter().fit(pd.concat(each, ignore_index=True), "days", "cens", fit_options=TIGHT)
    mine = binned.coefficients.set_index("name")
    np.testing.assert_allclose(mine["estimate"].to_numpy(), reference.params_.to_numpy(), rtol=1e-6)
    np.testing.assert_allclose(mine["se"].to_numpy(), reference.standard_errors_.to_numpy(), rtol=1e-6)
    assert binned.raw["hazards_test"]["global_df"] == 2 and 0 <= binned.raw["hazards_test"]["global_pvalue"] <= 1
    # stratified, with its hazards check over the same bins (the sets the binned fit released: nothing new leaves)
    checked = client.cox("age + treat", "actg175", "days", "cens", edges=EDGES)
    hazards = checked.raw["hazards_test"]  # each site its own stratum, its binned times at the fit
    assert hazards.get("names") == ["age", "treat"] and hazards["global_df"] == 2, hazards
    assert all(0 <= p <= 1 for p in [*hazards["pvalues"], hazards["global_pvalue"]])
    assert "each site its own stratum" in checked.notes[-1]
    with pytest.raises(Rejected, match="unknown column 'weeks'"):
        client.km("actg175", "weeks", "cens", EDGES)
    with pytest.raises(RequestInvalid, match="bin edges increase"):
        client.km("actg175", "days", "cens", [360, 180])
    with pytest.raises(Rejected, match=r"no site fits this model \(Cleveland: .*model_alone = false"):
        client.cox("age", "actg175", "days", "cens", sites=["Cleveland"])
