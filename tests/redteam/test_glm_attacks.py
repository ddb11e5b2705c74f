"""Attacks on a GLM fitted across sites (issue 29's core: ``site_agent.queries.glm``): a researcher who may choose
the formula tries to make a site's statistics give one patient's values back. Each attack is shown to work on the
statistics a site would compute, and then shown refused by the site's check before any of them could leave. Real
data: Cleveland's heart-disease table; no federation is needed, the check and the statistics are the site's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flip_core.glm import FormulaInvalid, parse_formula
from site_agent.data.tables import UCI_HEART
from site_agent.queries.glm import ModelRefused, check, design, statistics

THRESHOLD = 10


@pytest.fixture
def cleveland(heart_dir: Path) -> pd.DataFrame:
    return UCI_HEART.read(heart_dir / "processed.cleveland.data")


def test_an_outcome_that_picks_out_one_patient_would_give_their_values_back_and_is_refused(cleveland) -> None:
    """``I(age == 29) ~ chol``: one patient in Cleveland is 29. At the first iteration (coefficients zero) the
    site's X'Wz is X'(y - 1/2), so its cholesterol is X'Wz's second entry plus half the sum of all cholesterol,
    which X'WX holds: the patient's value, exactly. The site refuses the model: a 0/1 outcome with one side under
    its threshold."""
    formula = parse_formula("I(age == 29) ~ chol")
    x, y = design(cleveland, formula, {})
    first = statistics(x, y, np.zeros(2), "binomial")
    recovered = first.xtwz[1] + 0.5 * first.xtwx[0, 1] / 0.25
    assert recovered == pytest.approx(float(cleveland.loc[cleveland["age"] == 29, "chol"].iloc[0]))  # the attack works
    with pytest.raises(ModelRefused, match="is 0 or 1, and one of them is held by fewer than 10 rows here") as refused:
        check(cleveland, formula, {}, "binomial", THRESHOLD)
    assert "204" not in str(refused.value) and "29" not in str(refused.value)
    with pytest.raises(ModelRefused, match="is 0 or 1"):  # the same outcome as a linear model's
        check(cleveland, formula, {}, "gaussian", THRESHOLD)


def test_a_categorical_term_of_a_nearly_unique_column_is_refused(cleveland) -> None:
    """``chol ~ C(age)``: a level per age, some held by one patient; its indicator's coefficient is that patient's
    cholesterol less the reference. Refused: a level under the threshold."""
    levels = {"age": sorted({str(int(a)) for a in cleveland["age"]}, key=float)}
    with pytest.raises(ModelRefused, match=r"a level of 'age' is held by fewer than 10 rows here \(or none\)"):
        check(cleveland, parse_formula("chol ~ C(age)"), levels, "gaussian", THRESHOLD)
    with pytest.raises(ModelRefused, match="has a level here that the model's levels do not name"):
        check(cleveland, parse_formula("chol ~ C(sex)"), {"sex": ["1"]}, "gaussian", THRESHOLD)  # a level left out


def test_a_model_with_about_as_many_parameters_as_rows_is_refused(cleveland) -> None:
    """Twelve rows and six parameters: X'X and X'y of so few rows nearly determine them. Refused: more parameters
    than a fifth of the site's complete rows (and fewer rows than the threshold, for fewer rows still)."""
    model = parse_formula("chol ~ age + trestbps + thalach + oldpeak + sex")
    with pytest.raises(ModelRefused, match="the model has 6 parameters, more than 0.2 of this site's complete rows"):
        check(cleveland.head(12), model, {}, "gaussian", THRESHOLD)
    with pytest.raises(ModelRefused, match="fewer than 10 complete rows here for this model"):
        check(cleveland.head(6), model, {}, "gaussian", THRESHOLD)
    check(cleveland, model, {}, "gaussian", THRESHOLD)  # the same model over the whole table is answered


@pytest.mark.parametrize(
    "text",
    [
        "I(num > 0) ~ __import__('os').system('id')",
        "I(num > 0) ~ age + exec('x=1')",
        "I(__import__('os').getpid() > 0) ~ age",
        "chol ~ age; import os",
        "chol ~ I(age * 2)",
    ],
)
def test_a_formula_that_is_code_is_refused_before_any_data_is_read(text: str) -> None:
    with pytest.raises(FormulaInvalid):
        parse_formula(text)
