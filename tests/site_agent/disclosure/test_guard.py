from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from flip_core.protocol import StepResult
from site_agent.disclosure.guard import MAX_METRICS, Declared, announced, describe_outgoing, guard

THRESHOLD = 10


def _model() -> dict[str, np.ndarray]:
    return {"fc.weight": np.zeros((1, 13), dtype=np.float32), "fc.bias": np.zeros(1, dtype=np.float32)}


DECLARED = Declared.from_params(_model())


def _honest(**changes: object) -> StepResult:
    params = {"fc.weight": np.arange(13, dtype=np.float32).reshape(1, 13), "fc.bias": np.ones(1, dtype=np.float32)}
    result = StepResult(
        site="A",
        status="ok",
        params=params,
        train_metrics={"loss": 0.25, "num_batches": 40.0},
        eval_metrics={"accuracy": 0.8, "auc": 0.7},
        num_train=120,
        num_test=30,
        fingerprint="fp",
        seconds=1.5,
    )
    for name, value in changes.items():
        setattr(result, name, value)
    return result


def test_declared_from_params_records_shapes_and_dtypes() -> None:
    assert DECLARED.shapes == {"fc.weight": (1, 13), "fc.bias": (1,)}
    assert DECLARED.dtypes == {"fc.weight": "float32", "fc.bias": "float32"}


def test_honest_result_passes_unchanged() -> None:
    result = _honest()
    guarded = guard(result, DECLARED, THRESHOLD)
    out = guarded.result
    assert guarded.stripped == []
    assert out is not result and out.params is not result.params
    assert set(out.params) == set(result.params)
    for name, arr in result.params.items():
        assert np.array_equal(out.params[name], arr) and out.params[name].dtype == arr.dtype
    assert out.train_metrics == result.train_metrics and out.eval_metrics == result.eval_metrics
    assert (out.status, out.num_train, out.num_test, out.site, out.fingerprint, out.seconds) == (
        "ok",
        120,
        30,
        "A",
        "fp",
        1.5,
    )


def _bad_params() -> dict[str, dict[str, np.ndarray]]:
    good = _honest().params
    nan = {**good, "fc.weight": good["fc.weight"].copy()}
    nan["fc.weight"][0, 3] = np.nan
    return {
        "shape": {**good, "fc.weight": np.zeros((3, 2), dtype=np.float32)},
        "extra": {**good, "leak": np.zeros(4, dtype=np.float32)},
        "missing": {"fc.weight": good["fc.weight"]},
        "dtype": {**good, "fc.bias": good["fc.bias"].astype(np.float64)},
        "nan": nan,
        "inf": {**good, "fc.bias": np.array([np.inf], dtype=np.float32)},
    }


@pytest.mark.parametrize("case", sorted(_bad_params()))
def test_params_not_matching_the_declared_model_are_all_removed(case: str) -> None:
    guarded = guard(_honest(params=_bad_params()[case]), DECLARED, THRESHOLD)
    out = guarded.result
    assert out.params == {}
    assert (out.status, out.error_type) == ("error", "BadParameters")
    assert out.error_where == "train() (the returned parameters do not match the declared model)"
    assert len(guarded.stripped) == 1 and guarded.stripped[0].startswith("parameters removed:")
    assert out.eval_metrics == {"accuracy": 0.8, "auc": 0.7}  # metrics are judged on their own


def test_param_sentences_name_the_problem_but_not_undeclared_names() -> None:
    bad = _bad_params()
    said = {case: guard(_honest(params=bad[case]), DECLARED, THRESHOLD).stripped[0] for case in bad}
    assert "'fc.weight' has shape (3, 2) but the model declares (1, 13)" in said["shape"]
    assert "dtype float64" in said["dtype"] and "'fc.bias'" in said["dtype"]
    assert "missing 'fc.bias'" in said["missing"]
    assert "non-finite" in said["nan"] and "'fc.weight'" in said["nan"]
    assert "leak" not in said["extra"] and "1 undeclared" in said["extra"]


def test_empty_params_stay_empty_and_pass() -> None:
    guarded = guard(_honest(params={}), DECLARED, THRESHOLD)
    assert guarded.result.params == {} and guarded.result.status == "ok" and guarded.stripped == []


def test_rows_disguised_as_metrics_are_capped_and_counted() -> None:
    rows = {f"row_{i}": float(i) + 0.5 for i in range(50)}
    guarded = guard(_honest(eval_metrics=rows), DECLARED, THRESHOLD)
    kept = guarded.result.eval_metrics
    assert len(kept) == MAX_METRICS
    assert list(kept) == sorted(rows)[:MAX_METRICS]
    assert "30 eval metrics over the limit of 20 removed" in guarded.stripped
    assert len(guard(_honest(eval_metrics=rows), DECLARED, THRESHOLD, max_metrics=5).result.eval_metrics) == 5


def test_only_the_projects_metric_names_leave_and_the_researcher_is_told_how_many_did_not() -> None:
    rows = {f"age_{i}": float(60 + i) for i in range(14)}
    guarded = guard(
        _honest(train_metrics={**rows, "loss": 0.3}, eval_metrics={"accuracy": 0.8, "v1": 63.0}),
        DECLARED,
        THRESHOLD,
        metrics=("loss", "accuracy"),
    )
    assert (guarded.result.train_metrics, guarded.result.eval_metrics) == ({"loss": 0.3}, {"accuracy": 0.8})
    assert guarded.result.withheld == (
        "14 train metric(s) withheld: not among the project's metrics here (loss, accuracy); "
        "1 eval metric(s) withheld: not among the project's metrics here (loss, accuracy)"
    )
    assert "age_" not in " ".join(guarded.stripped) and "v1" not in guarded.result.withheld
    forged = guard(_honest(withheld="free text from the task"), DECLARED, THRESHOLD)
    assert forged.result.withheld == ""  # only the guard writes it


def test_metric_with_disallowed_name_is_removed_without_echoing_it() -> None:
    names = ["age=63,sex=1", "x" * 41, "1abc", "loss\n"]
    guarded = guard(_honest(train_metrics={**{n: 1.5 for n in names}, "loss": 0.3}), DECLARED, THRESHOLD)
    assert guarded.result.train_metrics == {"loss": 0.3}
    text = " ".join(guarded.stripped)
    assert "age" not in text and "63" not in text and "x" * 41 not in text and "1abc" not in text
    assert "4 train metric(s) with a disallowed name removed" in guarded.stripped


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, np.bool_(False), "0.5", None])
def test_non_finite_bool_and_non_number_metrics_are_removed(value: object) -> None:
    guarded = guard(_honest(eval_metrics={"accuracy": 0.8, "odd": value}), DECLARED, THRESHOLD)
    assert guarded.result.eval_metrics == {"accuracy": 0.8}
    assert guarded.stripped == ["eval metric 'odd' removed: not a finite number"]


def test_numpy_and_int_metrics_leave_as_plain_floats() -> None:
    out = guard(_honest(eval_metrics={"auc": np.float32(0.5), "epochs": 3}), DECLARED, THRESHOLD).result
    assert out.eval_metrics == {"auc": 0.5, "epochs": 3.0}
    assert all(type(v) is float for v in out.eval_metrics.values())


def test_small_counts_are_suppressed_but_large_counts_and_rates_kept() -> None:
    metrics = {"n_positive": 3.0, "num_cases": 12.0, "accuracy": 1.0, "positive_count": 9, "total": 0.0}
    guarded = guard(_honest(eval_metrics=metrics), DECLARED, THRESHOLD)
    assert guarded.result.eval_metrics == {"num_cases": 12.0, "accuracy": 1.0, "total": 0.0}
    assert "eval metric 'n_positive' suppressed: a count below the threshold of 10" in guarded.stripped
    assert len(guarded.stripped) == 2 and not any("3" in s or "9" in s for s in guarded.stripped)


def test_few_training_rows_suppress_params_train_metrics_and_count() -> None:
    guarded = guard(_honest(num_train=5), DECLARED, THRESHOLD)
    out = guarded.result
    assert out.status == "suppressed" and out.error_where == "fewer than 10 training rows at this site"
    assert out.params == {} and out.train_metrics == {} and out.num_train == 0
    assert out.eval_metrics == {"accuracy": 0.8, "auc": 0.7} and out.num_test == 30
    assert any("fewer than 10 rows" in s for s in guarded.stripped)


def test_training_rows_at_the_threshold_pass() -> None:
    out = guard(_honest(num_train=THRESHOLD, num_test=THRESHOLD), DECLARED, THRESHOLD).result
    assert out.status == "ok" and out.num_train == THRESHOLD and out.num_test == THRESHOLD and out.params


def test_few_test_rows_suppress_eval_metrics_only() -> None:
    out = guard(_honest(num_test=5), DECLARED, THRESHOLD).result
    assert out.eval_metrics == {} and out.num_test == 0
    assert out.status == "ok" and out.train_metrics and out.params and out.num_train == 120


def test_few_training_rows_keep_an_error_status() -> None:
    out = guard(
        _honest(status="error", error_type="ValueError", error_where="train()", num_train=5), DECLARED, THRESHOLD
    ).result
    assert (out.status, out.error_type, out.error_where) == ("error", "ValueError", "train()")


@pytest.mark.parametrize("count", [-1, 12.5, True, "12"])
def test_row_counts_that_are_not_whole_numbers_become_zero(count: object) -> None:
    guarded = guard(_honest(num_train=count), DECLARED, THRESHOLD)
    assert guarded.result.num_train == 0
    assert guarded.stripped == ["train count removed: not a non-negative whole number"]


def test_free_text_in_errors_is_replaced() -> None:
    result = _honest(
        status="error",
        params={},
        error_type="Patient 63 has diabetes",
        error_line=7,
        error_where="ValueError: patient 63 at site A has diabetes",
    )
    out = guard(result, DECLARED, THRESHOLD).result
    assert (out.error_type, out.error_where, out.error_line) == ("Error", "the task", 7)


@pytest.mark.parametrize(
    "where",
    ["the cell", "build_model()", "train()", "evaluate()", "the site agent", "train() (must return a dict of numbers)"],
)
def test_fixed_error_places_pass(where: str) -> None:
    result = _honest(status="error", params={}, error_type="torch.cuda.OutOfMemoryError", error_where=where)
    out = guard(result, DECLARED, THRESHOLD).result
    assert (out.error_type, out.error_where) == ("torch.cuda.OutOfMemoryError", where)


def test_guarding_twice_changes_nothing_more() -> None:
    once = guard(_honest(num_train=5), DECLARED, THRESHOLD).result
    twice = guard(once, DECLARED, THRESHOLD)
    assert (
        twice.stripped == []
        and twice.result.error_where == once.error_where == "fewer than 10 training rows at this site"
    )


def test_input_is_not_mutated() -> None:
    result = _honest(
        num_train=5,
        num_test=5,
        eval_metrics={"age=63": 1.0, "n_pos": 2.0, "bad": float("nan")},
        status="error",
        error_where="free text",
    )
    before = copy.deepcopy(result)
    guard(result, DECLARED, THRESHOLD)
    for name in ("status", "train_metrics", "num_train", "num_test", "error_where", "error_type", "site"):
        assert getattr(result, name) == getattr(before, name)
    assert np.isnan(result.eval_metrics["bad"]) and set(result.eval_metrics) == set(before.eval_metrics)
    assert set(result.params) == set(before.params)
    assert all(np.array_equal(result.params[k], before.params[k]) for k in before.params)
    bad = _honest(params={"fc.weight": np.zeros((3, 2), dtype=np.float32)})
    guard(bad, DECLARED, THRESHOLD)
    assert bad.status == "ok" and bad.params["fc.weight"].shape == (3, 2)


def test_describe_outgoing_has_names_and_shapes_but_no_values() -> None:
    planted = 123456.789
    params = {"fc.weight": np.full((1, 13), planted, dtype=np.float32), "fc.bias": np.full(1, planted, np.float32)}
    out = guard(
        _honest(params=params, train_metrics={"loss": planted}, eval_metrics={"auc": planted}), DECLARED, THRESHOLD
    ).result
    described = describe_outgoing(out)
    assert described == {
        "status": "ok",
        "params": {"fc.weight": {"shape": [1, 13], "dtype": "float32"}, "fc.bias": {"shape": [1], "dtype": "float32"}},
        "param_bytes": 14 * 4,
        "train_metrics": ["loss"],
        "eval_metrics": ["auc"],
        "num_train": 120,
        "num_test": 30,
    }
    text = json.dumps(describe_outgoing(out))
    assert "123456" not in text and "123457" not in text


def test_an_announced_dataset_withholds_row_counts_under_the_threshold() -> None:
    summary = {"name": "rare-disease", "rows": 9, "train_rows": 7, "test_rows": 2, "columns": ["age"]}
    assert announced(summary, 10) == {
        "name": "rare-disease",
        "rows": None,
        "train_rows": None,
        "test_rows": None,
        "columns": ["age"],
    }
    assert announced({**summary, "rows": 200, "train_rows": 160, "test_rows": 40}, 10)["train_rows"] == 160
