"""GLMs fitted across sites (issue 29, first part): each hospital's statistics at every IRLS iteration, summed, fit
what statsmodels fits on the pooled rows, on the four real heart-disease tables (``flip_core.glm``,
``site_agent.queries.glm``); and the site's refusals, each a sentence holding no value of its data."""

from __future__ import annotations

from functools import reduce
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
import statsmodels.formula.api as smf

from flip_core.glm import FormulaInvalid, Statistics, fit, parameter_names, parse_formula
from flip_local.sites import HEART_SITES
from site_agent.data.tables import UCI_HEART
from site_agent.queries.glm import ModelRefused, check, design, statistics

THRESHOLD = 10


@pytest.fixture
def hospitals(heart_dir: Path) -> dict[str, pd.DataFrame]:
    return {site: UCI_HEART.read(heart_dir / name) for site, name in HEART_SITES.items()}


def federated(tables: dict[str, pd.DataFrame], text: str, family: str, levels: dict[str, list[str]]) -> object:
    formula = parse_formula(text)
    for table in tables.values():
        check(table, formula, levels, family, THRESHOLD)  # every site would release its statistics
    designs = [design(table, formula, levels) for table in tables.values()]
    asked = []

    def ask(beta: np.ndarray) -> Statistics:
        asked.append(beta)
        return reduce(lambda a, b: a + b, (statistics(x, y, beta, family) for x, y in designs))

    result = fit(ask, family, parameter_names(formula, levels))
    assert result.iterations == len(asked) < 15
    return result


def test_a_logistic_model_over_the_hospitals_is_statsmodels_fit_on_their_pooled_rows(hospitals) -> None:
    """Heart disease on age, sex, maximum heart rate, exercise angina and ST depression: Cleveland and Hungary (VA
    and Switzerland refuse it: too few women, too few without the disease); then a model without sex over Cleveland,
    Hungary and VA; maximum heart rate on chest pain type (a categorical term), linear, over Cleveland and Hungary
    (with the outcome, chest pain type 2 crosses too few with disease at both: refused below)."""
    for text, sites, levels in [
        ("I(num > 0) ~ age + sex + thalach + exang + oldpeak", ("Cleveland", "Hungary"), {}),
        ("I(num > 0) ~ age + thalach + exang + oldpeak", ("Cleveland", "Hungary", "VA"), {}),
        ("thalach ~ age + sex + C(cp)", ("Cleveland", "Hungary"), {"cp": ["1", "2", "3", "4"]}),
    ]:
        family = "gaussian" if text.startswith("thalach") else "binomial"
        tables = {s: hospitals[s] for s in sites}
        result = federated(tables, text, family, levels)
        pooled = pd.concat(tables.values(), ignore_index=True)
        data = pooled.assign(cp=pooled["cp"].astype("Int64").astype(str), disease=(pooled["num"] > 0).astype(int))
        # (patsy reads a boolean outcome as two columns and statsmodels models the first, False: a 0/1 column here)
        sm_family = sm.families.Gaussian() if family == "gaussian" else sm.families.Binomial()
        reference = smf.glm(text.replace("I(num > 0)", "disease"), data, family=sm_family).fit()
        names = result.names  # statsmodels' own names (patsy puts a categorical term's first: compared by name)
        assert sorted(names) == sorted(reference.params.index)
        np.testing.assert_allclose(result.params, reference.params[names].to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(result.bse, reference.bse[names].to_numpy(), rtol=1e-6)
        # p-values as far down as 1e-9 move most with the last digits of z: statsmodels stops its IRLS sooner
        np.testing.assert_allclose(result.pvalues(), reference.pvalues[names].to_numpy(), rtol=1e-4)
        intervals = reference.conf_int().loc[names].to_numpy()  # a bound near zero: to 1e-6 of the standard error
        np.testing.assert_allclose(result.conf_int(), intervals, rtol=1e-6, atol=1e-6 * float(result.bse.max()))
        assert result.rows == reference.nobs and abs(result.deviance - reference.deviance) < 1e-6
    for refusing, said in (("VA", "sex is 0 or 1"), ("Switzerland", "is 0 or 1")):
        with pytest.raises(ModelRefused, match=said):
            check(hospitals[refusing], parse_formula("I(num > 0) ~ age + sex"), {}, "binomial", THRESHOLD)


def test_a_poisson_and_a_linear_model_over_the_hospitals_are_statsmodels_fits_too(hospitals) -> None:
    """Disease severity (num, 0 to 4) as a count, over the four hospitals; maximum heart rate, linear."""
    for text, family, sm_family in [
        ("num ~ age + thalach + oldpeak", "poisson", sm.families.Poisson()),
        ("thalach ~ age + trestbps + oldpeak", "gaussian", sm.families.Gaussian()),
    ]:
        result = federated(hospitals, text, family, {})
        reference = smf.glm(text, pd.concat(hospitals.values(), ignore_index=True), family=sm_family).fit()
        np.testing.assert_allclose(result.params, reference.params.to_numpy(), rtol=1e-6)
        np.testing.assert_allclose(result.bse, reference.bse.to_numpy(), rtol=1e-6)
        assert result.rows == reference.nobs
    with pytest.raises(ModelRefused, match="fewer than 10 complete rows here"):  # ca: nearly all missing at Hungary
        check(hospitals["Hungary"], parse_formula("ca ~ age + oldpeak"), {}, "poisson", THRESHOLD)


def test_a_site_refuses_a_model_its_rows_could_be_solved_back_from_or_a_small_level(hospitals) -> None:
    va = hospitals["VA"]
    model = parse_formula("I(num > 0) ~ age + sex + C(cp) + trestbps + chol + thalach + oldpeak")
    levels = {"cp": ["1", "2", "3", "4"]}
    few = hospitals["Cleveland"].head(40)  # 40 rows: 10 parameters are more than a fifth of them
    with pytest.raises(ModelRefused, match=r"the model has 10 parameters, more than 0.2 of this site's") as refused:
        check(few, model, levels, "binomial", THRESHOLD)
    assert not any(ch.isdigit() for ch in str(refused.value).replace("10 parameters", "").replace("0.2", ""))
    with pytest.raises(ModelRefused, match=r"a level of 'cp' is held by fewer than 10 rows here \(or none\)"):
        check(va, parse_formula("I(num > 0) ~ age + C(cp)"), levels, "binomial", THRESHOLD)  # cp 1: 4 rows at VA
    with pytest.raises(ModelRefused, match=r"^sex is 0 or 1, and one of them is held by fewer than 10 rows here$"):
        check(va, parse_formula("thalach ~ age + sex"), {}, "gaussian", THRESHOLD)  # 5 women at VA
    for site in ("Cleveland", "Hungary"):  # chest pain type 2 with disease: fewer than 10 at each
        with pytest.raises(
            ModelRefused, match=r"^C\(cp\)\[T.2\] and num cross in fewer than 10 rows here \(but some\)$"
        ):
            check(hospitals[site], parse_formula("I(num > 0) ~ age + C(cp)"), levels, "binomial", THRESHOLD)
    with pytest.raises(ModelRefused, match="a binomial model's outcome is 0 or 1"):
        check(va, parse_formula("num ~ age"), {}, "binomial", THRESHOLD)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("num > 0 ~ age", "the outcome 'num > 0' is not a column"),
        ("I(num > 0) ~ age + __import__('os')", "is not a column, C(column), 1 or 0"),
        ("I(num > 0) ~ age + age", "the column 'age' is in the formula twice"),
        ("num ~ num + age", "the outcome 'num' is a term of the model too"),
        ("num ~ 0", "the model has no terms"),
        ("num + age", "with one '~'"),
    ],
)
def test_a_formula_is_parsed_never_evaluated_and_a_wrong_one_is_refused_naming_the_part(text: str, said: str) -> None:
    with pytest.raises(FormulaInvalid) as refused:
        parse_formula(text)
    assert said in str(refused.value)
