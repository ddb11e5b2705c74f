"""The OMOP study end to end (issue 28): ``flip up --demo omop`` (a PostgreSQL of the federation's own holding three
hospitals' OMOP CDM databases and the whole of Eunomia in a fourth, held by no site), and the Eunomia notebook under
``flip run``: characterisation, a Circe cohort, a declared covariate specification, and a logistic regression fitted
across the sites by Newton's method inside FedAvg, beside statsmodels' fit on the pooled persons.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from flip_local.eunomia import POOLED_SOURCE, SITES, pooled_table
from flip_local.processes import Federation
from flip_magics.client import FlipClient

from helpers import flip_run, local_federation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("flip-omop")
    with local_federation(home, demo="omop") as connection:
        client = FlipClient(connection["coordinator_url"], connection["token"], timeout=120)
        yield {**connection, "home": home, "client": client}


def test_the_omop_demo_starts_three_hospitals_on_a_postgresql_of_its_own(study: dict[str, Any]) -> None:
    sites = {s["site"]: s for s in study["client"].sites()}
    assert sorted(sites) == sorted(SITES)
    for name, site in sites.items():
        (dataset,) = site["datasets"]
        assert dataset["name"] == "gibleed" and dataset["format"] == "omop", name
    root = Federation(study["home"]).root
    assert (root / POOLED_SOURCE).exists()  # the pooled reference database, which no site announces
    secrets = sorted((root / "omop-secrets").iterdir())
    assert secrets and all(p.stat().st_mode & 0o077 == 0 for p in secrets)  # each role's password: owner-only


def test_the_gibleed_notebook_fits_across_the_sites_what_statsmodels_fits_on_the_pooled_persons(
    study: dict[str, Any], tmp_path: Path
) -> None:
    execution = flip_run("03_omop_gibleed.ipynb", tmp_path, rounds=8)
    assert len(execution["runs"]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert sum(summary["persons"].values()) == summary["pooled_persons"] == 2104  # the sites' training splits
    for name, pooled in summary["pooled"].items():  # the README's tolerance: 1e-9, measured 5e-16
        assert abs(summary["federated"][name] - pooled) <= 1e-9 * max(1.0, abs(pooled)), name
        assert abs(summary["federated_se"][name] - summary["pooled_se"][name]) <= 1e-9, name
    assert abs(summary["auc_federated"] - summary["auc_pooled"]) <= 1e-9
    assert round(summary["pooled"]["celecoxib"], 6) == 0.321262  # the README's figure
    record = json.loads((tmp_path / "records" / f"{execution['runs'][0]}.json").read_text())
    assert record["covariates"]["outcome"]["name"] == "gi_bleed" and record["cohort"]["name"] == "nsaid_new_users"
    assert record["covariates"] == summary["record_covariates"]
    characterised_as_the_cdm_says(study, tmp_path, summary)


def characterised_as_the_cdm_says(study: dict[str, Any], out: Path, summary: dict[str, Any]) -> None:
    """The notebook's characterisation of the cohort against the truth, worked out from the pooled database (the
    same persons): each released count within its noise (each site's moves by at most 2: pooled, at most 6)."""
    definition = json.loads((out / "nsaid_new_users.json").read_text())
    spec = {"features": [{"name": "oa", "domain": "condition", "concepts": [80180], "descendants": False,
                          "window": [-365, 0]}]}  # fmt: skip
    truth = pooled_table(definition, spec, study["home"])
    assert {s: n for s, n in truth.groupby("site").size().items()} == pytest.approx(summary["cohort"], abs=2)
    truth["age_group"] = [f"{a // 5 * 5}-{a // 5 * 5 + 4}" for a in truth["age"]]
    by_gender_age = truth.groupby(["gender", "age_group"]).size()
    assert len(summary["by_gender_age"]) == len(by_gender_age) == 8
    for (gender, group), n in by_gender_age.items():
        assert abs(summary["by_gender_age"][f"{gender}/{group}"] - n) <= 6, (gender, group)
    assert set(summary["top_conditions"].values()) == {"Osteoarthritis (80180)"}  # the vocabulary's name, and id
    for site, n in truth.groupby("site")["oa"].sum().items():
        assert abs(summary["top_condition_counts"][site] - n) <= 2, site
    assert summary["top_drugs"][:2] == ["celecoxib (1118084)", "Diclofenac (1124300)"]  # the cohort's own drugs
    survival_as_lifelines_and_statsmodels_fit_the_pooled_persons(study, out, summary)


def survival_as_lifelines_and_statsmodels_fit_the_pooled_persons(
    study: dict[str, Any], out: Path, summary: dict[str, Any]
) -> None:
    """The notebook's Kaplan-Meier curves by drug, its Cox model stratified by site and its logistic regression, all
    within the cohort and of the declared table, against lifelines and statsmodels on the same persons' table built
    over the whole of Eunomia (the truth: no site held it)."""
    from lifelines import CoxPHFitter, KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    from flip_core.survival import binned_times

    definition = json.loads((out / "nsaid_new_users.json").read_text())
    covariates = json.loads((out / "gibleed_covariates.json").read_text())
    truth = pooled_table(definition, covariates, study["home"])
    km = summary["km"]
    times, events = binned_times(truth["gi_bleed_days"].to_numpy(), truth["gi_bleed"].to_numpy(), km["kept_edges"])
    for level, survival in km["survival"].items():
        rows = (truth["celecoxib"] == int(level)).to_numpy()
        reference = KaplanMeierFitter().fit(times[rows], events[rows])
        expected = reference.survival_function_at_times(km["kept_edges"]).to_numpy()
        assert survival == pytest.approx(list(expected), abs=1e-9), level
    logrank = multivariate_logrank_test(times, truth["celecoxib"], events)
    assert km["logrank"]["statistic"] == pytest.approx(logrank.test_statistic, rel=1e-9)
    columns = ["gi_bleed_days", "gi_bleed", "celecoxib", "age", "prior_conditions", "site"]
    tight = {"precision": 1e-12, "r_precision": 1e-14}  # lifelines converged to its maximum (its defaults stop short)
    cox = CoxPHFitter().fit(truth[columns], "gi_bleed_days", "gi_bleed", strata=["site"], fit_options=tight)
    assert summary["cox"]["refused"] == {} and sum(summary["cox"]["sites"].values()) == len(truth)
    for name, fitted in summary["cox"]["coefficients"].items():
        assert fitted["estimate"] == pytest.approx(cox.params_[name], rel=1e-6), name
        assert fitted["se"] == pytest.approx(cox.standard_errors_[name], rel=1e-6), name
    glm = smf.glm("gi_bleed ~ celecoxib + age + prior_conditions", truth, family=sm.families.Binomial())
    reference = glm.fit()
    assert summary["glm"]["refused"] == {}
    for name, fitted in summary["glm"]["coefficients"].items():
        assert fitted["estimate"] == pytest.approx(reference.params[name], rel=1e-6), name
        assert fitted["se"] == pytest.approx(reference.bse[name], rel=1e-6), name
