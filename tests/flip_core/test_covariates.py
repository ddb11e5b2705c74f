"""A covariate specification (``flip_core.covariates``): what it accepts, what it refuses in a sentence naming the
part, and how it joins the code hash a site approves (``flip_core.cell.task_hash``)."""

from __future__ import annotations

from typing import Any

import pytest

from flip_core.api import TaskSpec, parse
from flip_core.cell import source_hash, task_hash
from flip_core.covariates import canonical, read_covariates
from flip_core.errors import RequestInvalid

SPEC: dict[str, Any] = {
    "features": [
        {"name": "celecoxib", "domain": "drug", "concepts": [1118084], "window": [0, 0]},
        {
            "name": "prior_conditions",
            "domain": "condition",
            "concepts": [441840],
            "window": [-365, -1],
            "value": "count",
        },
    ],
    "outcome": {"name": "gi_bleed", "domain": "condition", "concepts": [192671], "window": [1, 3650]},
}


def test_a_specification_names_its_table_columns_in_order_with_defaults_filled_in() -> None:
    spec = read_covariates(SPEC)
    assert spec.columns() == [
        "gender",
        "age",
        "index_year",
        "celecoxib",
        "prior_conditions",
        "gi_bleed",
        "gi_bleed_days",
    ]
    assert spec.features[0].descendants and spec.features[0].value == "presence"
    assert read_covariates(canonical(spec)) == spec  # its canonical text reads back as itself


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (
            {"features": [{"name": "x", "domain": "drug", "concepts": ["1118084"]}]},
            "features.0.concepts.0: must be a whole",
        ),
        ({"features": [{"name": "x", "domain": "drug", "concepts": [1.5]}]}, "must be a whole number"),
        ({"features": [{"name": "x", "domain": "drug", "concepts": [True]}]}, "features.0.concepts.0"),
        ({"features": [{"name": "x; drop table person", "domain": "drug", "concepts": [1]}]}, "is not a column name"),
        ({"features": [{"name": "x", "domain": "pg_authid", "concepts": [1]}]}, "features.0.domain"),
        ({"features": [{"name": "x", "domain": "drug", "concepts": []}]}, "features.0.concepts"),
        ({"features": [{"name": "x", "domain": "drug", "concepts": [1], "value": "last"}]}, "a last value is a"),
        ({"features": [{"name": "x", "domain": "drug", "concepts": [1], "window": [3, -3]}]}, "window 3..-3"),
        ({"outcome": {"name": "y", "domain": "condition", "concepts": [1], "window": [-5, 10]}}, "starts at the index"),
        ({"outcome": {"name": "age", "domain": "condition", "concepts": [1]}}, "'age' is named twice"),
        ({"sql": "select 1"}, "at sql: Extra inputs are not permitted"),
    ],
)
def test_a_wrong_specification_is_refused_in_a_sentence_naming_the_part(change: dict[str, Any], said: str) -> None:
    with pytest.raises(ValueError, match="covariate specification") as caught:
        read_covariates(change)
    assert said in str(caught.value)
    with pytest.raises(RequestInvalid, match="covariates"):  # the hub's body refuses it the same way
        parse(TaskSpec, {"source": "x = 1", "dataset": "gibleed", "covariates": change}, "the task")


def test_the_approved_hash_covers_the_source_and_the_specification_together() -> None:
    source = "def build_model():\n    return None\n"
    assert task_hash(source) == task_hash(source, None) == source_hash(source)
    with_spec = task_hash(source, SPEC)
    assert with_spec != source_hash(source)
    assert task_hash(source + "\n\n", SPEC) == with_spec  # the source's normal form, as for any cell
    wider = {**SPEC, "outcome": {**SPEC["outcome"], "window": [1, 365]}}
    assert task_hash(source, wider) != with_spec  # another window is another task to approve
    defaults = {**SPEC, "demographics": ["gender", "age", "index_year"]}
    assert task_hash(source, defaults) == with_spec  # written out or left to its default, the same table
