"""Attacks on a GLM fitted across sites (issue 29's core: ``site_agent.queries.glm``): a researcher who may choose
the formula tries to make a site's statistics give one patient's values back. Each attack is shown to work on the
statistics a site would compute, and then shown refused by the site's check before any of them could leave. Real
data: Cleveland's heart-disease table; no federation is needed, the check and the statistics are the site's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flip_core.certs import make_site_keys
from flip_core.glm import FormulaInvalid, parse_formula
from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset
from site_agent.data.tables import UCI_HEART
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortStore
from site_agent.queries.glm import ModelRefused, check, design, statistics
from site_agent.queries.service import QueryService

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


def test_a_small_cross_of_a_term_and_the_outcome_would_be_told_by_the_first_iteration_and_is_refused(cleveland) -> None:
    """At the start (all coefficients 0) a logistic model's X'Wz is X'(y - 1/2): its entry for chest pain type 2 is
    the number of those patients with heart disease less half of them, a count under the threshold at Cleveland."""
    formula, levels = parse_formula("I(num > 0) ~ age + C(cp)"), {"cp": ["1", "2", "3", "4"]}
    x, y = design(cleveland, formula, levels)
    told = statistics(x, y, np.zeros(x.shape[1]), "binomial")
    column = 2  # Intercept, age, C(cp)[T.2]
    cases = told.xtwz[column] + 2 * told.xtwx[column, column]  # X'Wz = cases - n/2, X'WX's diagonal = n/4
    truth = int(((cleveland["cp"] == 2) & (cleveland["num"] > 0)).sum())
    assert round(cases) == truth and 0 < truth < THRESHOLD
    with pytest.raises(ModelRefused, match=r"C\(cp\)\[T.2\] and num cross in fewer than 10 rows here"):
        check(cleveland, formula, levels, "binomial", THRESHOLD)


def _hungary(heart_dir: Path, tmp_path: Path, alone: bool = True) -> QueryService:
    site = add_dataset(init_site(tmp_path / "Site", "Hungary"), "heart", heart_dir / "processed.hungarian.data",
                       "uci-heart")  # fmt: skip
    project = {"approved": True, "researchers": ["mallory"], "datasets": ["*"], "tasks": ["query"],
               "model_alone": alone}  # fmt: skip
    write_policy(site, {"policy": {}, "projects": {"study": project}})
    make_site_keys(site.root / "keys", "Hungary")
    return QueryService(site, Governance(site), CohortStore(site.root))


def _fit_step(service: QueryService, formula: str, stage: str, **model: Any) -> Any:
    body = {"formula": formula, "family": "gaussian", "stage": stage, "sites": 1, **model}
    request = QueryRequest(f"q-{len(formula)}-{stage}", "study", "mallory", "heart", QueryKind.GLM, model=body)
    return decode_reply(service.answer(encode_query(request)))


def test_two_models_whose_rows_differ_by_one_patient_missing_a_value_would_give_that_patient_and_are_refused(
    heart_dir: Path, tmp_path: Path
) -> None:
    """One patient at Hungary lacks a maximum heart rate: ``num ~ age`` is over all 294 rows, ``num ~ age + thalach``
    over the other 293, and the two fits' X'X and X'y differ by that patient's age and disease severity exactly. The
    site's ledger holds the first fit's ``values of age`` over its rows and refuses the second."""
    table = UCI_HEART.read(heart_dir / "processed.hungarian.data")
    lacking = table[table["thalach"].isna()]
    assert len(lacking) == 1
    first = [design(table, parse_formula(f), {}) for f in ("num ~ age", "num ~ age + thalach")]
    sums = [statistics(x, y, np.zeros(x.shape[1]), "gaussian") for x, y in first]
    assert sums[0].xtwx[0, 1] - sums[1].xtwx[0, 1] == lacking["age"].iloc[0]  # the attack works on the sums
    assert sums[0].xtwz[0] - sums[1].xtwz[0] == lacking["num"].iloc[0]
    service = _hungary(heart_dir, tmp_path)
    levels = _fit_step(service, "num ~ age", "levels")
    assert levels.status == StepStatus.OK and levels.table == {"rows": 294, "levels": {}}
    step = _fit_step(service, "num ~ age", "step", levels={}, beta=[0.0, 0.0])
    assert step.status == StepStatus.OK and step.table["statistics"]["rows"] == 294
    entered = {(e.tag, e.digest) for _, _, e in service.ledger._entries["heart"]}  # what the ledger now holds
    _, keys = service._table("heart")
    every = service.ledger.row_set(keys, np.arange(len(table))).digest  # the 294 rows themselves, by position
    assert {("values of age", every), ("values of num", every)} <= entered
    again = _fit_step(service, "num ~ age + thalach", "levels")
    assert again.status == StepStatus.REFUSED and again.table == {}
    assert "differ by fewer than the threshold from rows this site already released" in again.reason
    assert not any(ch.isdigit() for ch in again.reason)


def test_a_step_at_coefficients_of_the_wrong_shape_or_a_model_alone_is_refused(heart_dir: Path, tmp_path: Path) -> None:
    service = _hungary(heart_dir, tmp_path, alone=False)
    alone = _fit_step(service, "num ~ age", "levels")
    assert alone.status == StepStatus.REFUSED and "model_alone = false" in alone.reason
    shared = _hungary(heart_dir, tmp_path / "shared")
    wrong = _fit_step(shared, "num ~ age", "step", levels={}, beta=[0.0, 0.0, 1.0])
    assert wrong.status == StepStatus.REFUSED and "one finite number per parameter" in wrong.reason
    code = _fit_step(shared, "num ~ __import__('os')", "levels")
    assert code.status == StepStatus.REFUSED and "is not a column, C(column), 1 or 0" in code.reason
