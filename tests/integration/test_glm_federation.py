"""GLMs fitted across the real federation (issue 29): the notebook's client, the hub's model desk, the query line (a
Flower run), the four hospital site agents. The reference is statsmodels on the pooled rows of the shared files."""

from __future__ import annotations

import time

import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from flip_core.errors import Rejected, RequestInvalid
from flip_local.sites import HEART_SITES
from site_agent.data.formats import read_table

from helpers import shared_data

pytestmark = pytest.mark.integration
DATASET = "heart-disease"


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {site: read_table(shared_data() / DATASET / f, "uci-heart") for site, f in HEART_SITES.items()}


def test_a_logistic_model_fits_what_statsmodels_fits_on_the_answering_sites_rows(federation, tables) -> None:
    """Switzerland (too few without disease) and VA (too few women) say no in a sentence; Cleveland and Hungary fit."""
    started = time.monotonic()
    result = federation.client().glm("I(num > 0) ~ age + sex + oldpeak", DATASET, "binomial")
    print(f"fitted in {time.monotonic() - started:.2f} s, {result.iterations} iterations")
    assert list(result.sites["site"]) == ["Cleveland", "Hungary"] and list(result.sites["rows"]) == [303, 294]
    assert set(result.refused) == {"Switzerland", "VA"}
    assert "num is 0 or 1, and one of them is held by fewer than 10 rows here" in result.refused["Switzerland"]
    assert "sex is 0 or 1" in result.refused["VA"]
    pooled = pd.concat([tables["Cleveland"], tables["Hungary"]], ignore_index=True)
    pooled["disease"] = (pooled["num"] > 0).astype(int)
    reference = smf.glm("disease ~ age + sex + oldpeak", pooled, family=sm.families.Binomial()).fit()
    coefficients = result.coefficients.set_index("name")
    for column, theirs in (("estimate", reference.params), ("se", reference.bse)):
        pd.testing.assert_series_equal(coefficients[column], theirs, rtol=1e-6, check_names=False)
    assert (coefficients["odds_ratio"] > 0).all() and result.rows == reference.nobs
    assert 3 <= result.iterations < 15 and result.plot().axes[0].get_xscale() == "log"


def test_poisson_models_over_the_four_sites_and_one_a_site_ledger_refuses(federation, tables) -> None:
    """Disease severity as a count on age and ST depression, over the four hospitals; then with maximum heart rate,
    which one Hungarian patient lacks: that fit's sums over Hungary's other rows, less the first's, would be that
    patient's values, so Hungary's ledger says no and the others fit."""
    client = federation.client()
    for formula, sites in (
        ("num ~ age + oldpeak", ["Cleveland", "Hungary", "Switzerland", "VA"]),
        ("num ~ age + thalach + oldpeak", ["Cleveland", "Switzerland", "VA"]),
    ):
        result = client.glm(formula, DATASET, "poisson")
        assert list(result.sites["site"]) == sites, result.refused
        pooled = pd.concat([tables[s] for s in sites], ignore_index=True)
        reference = smf.glm(formula, pooled, family=sm.families.Poisson()).fit()
        coefficients = result.coefficients.set_index("name")
        pd.testing.assert_series_equal(coefficients["estimate"], reference.params, rtol=1e-6, check_names=False)
        pd.testing.assert_series_equal(coefficients["se"], reference.bse, rtol=1e-6, check_names=False)
        assert sum(result.sites["rows"]) == reference.nobs
    assert list(result.refused) == ["Hungary"]
    assert "differ by fewer than the threshold from rows this site already released" in result.refused["Hungary"]


def test_a_model_of_an_unknown_column_code_or_one_site_alone_is_refused_in_a_sentence(federation) -> None:
    client = federation.client()
    with pytest.raises(Rejected, match="unknown column 'chest' in dataset 'heart-disease'"):
        client.glm("num ~ age + chest", DATASET, "poisson")
    with pytest.raises(RequestInvalid, match="is not a column, C\\(column\\), 1 or 0"):
        client.glm("num ~ age + open('x')", DATASET)
    with pytest.raises(Rejected, match=r"no site fits this model \(Cleveland: .*model_alone = false"):
        client.glm("num ~ age", DATASET, "poisson", sites=["Cleveland"])
