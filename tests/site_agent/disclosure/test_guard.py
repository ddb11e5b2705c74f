from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from flip_core.protocol import StepResult
from site_agent.disclosure.guard import (
    MAX_METRICS,
    Declared,
    Guarded,
    Known,
    announced,
    describe_outgoing,
    guard,
    private_result,
)

THRESHOLD = 10
# what the agent knows: here only bounds on the rows (as of a cohort's), so that the claims below them stand
KNOWN = Known(site="A", fingerprint="fp", seconds=1.5, train_rows=1000, test_rows=1000, exact=False, lines=40)


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


def check(result: StepResult, **options: object) -> Guarded:
    return guard(result, DECLARED, THRESHOLD, KNOWN, **options)  # type: ignore[arg-type]


def test_declared_from_params_records_shapes_and_dtypes() -> None:
    assert DECLARED.shapes == {"fc.weight": (1, 13), "fc.bias": (1,)}
    assert DECLARED.dtypes == {"fc.weight": "float32", "fc.bias": "float32"}


def test_honest_result_passes_unchanged() -> None:
    result = _honest()
    guarded = check(result)
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
    guarded = check(_honest(params=_bad_params()[case]))
    out = guarded.result
    assert out.params == {}
    assert (out.status, out.error_type) == ("error", "BadParameters")
    assert out.error_where == "train() (the returned parameters do not match the declared model)"
    assert len(guarded.stripped) == 1 and guarded.stripped[0].startswith("parameters removed:")
    assert out.eval_metrics == out.train_metrics == {}  # a failed step sends no metric


def test_param_sentences_name_the_problem_but_not_undeclared_names() -> None:
    bad = _bad_params()
    said = {case: check(_honest(params=bad[case])).stripped[0] for case in bad}
    assert "'fc.weight' has shape (3, 2) but the model declares (1, 13)" in said["shape"]
    assert "dtype float64" in said["dtype"] and "'fc.bias'" in said["dtype"]
    assert "missing 'fc.bias'" in said["missing"]
    assert "non-finite" in said["nan"] and "'fc.weight'" in said["nan"]
    assert "leak" not in said["extra"] and "1 undeclared" in said["extra"]


def test_empty_params_stay_empty_and_pass() -> None:
    guarded = check(_honest(params={}))
    assert guarded.result.params == {} and guarded.result.status == "ok" and guarded.stripped == []


def test_rows_disguised_as_metrics_are_capped_and_counted() -> None:
    rows = {f"row_{i}": float(i) + 0.5 for i in range(50)}
    guarded = check(_honest(eval_metrics=rows))
    kept = guarded.result.eval_metrics
    assert len(kept) == MAX_METRICS
    assert list(kept) == sorted(rows)[:MAX_METRICS]
    assert "30 eval metrics over the limit of 20 removed" in guarded.stripped
    assert len(check(_honest(eval_metrics=rows), max_metrics=5).result.eval_metrics) == 5


def test_only_the_projects_metric_names_leave_and_the_researcher_is_told_neither_which_nor_how_many() -> None:
    rows = {f"age_{i}": float(60 + i) for i in range(14)}
    guarded = check(
        _honest(train_metrics={**rows, "loss": 0.3}, eval_metrics={"accuracy": 0.8, "v1": 63.0}),
        metrics=("loss", "accuracy"),
    )
    assert (guarded.result.train_metrics, guarded.result.eval_metrics) == ({"loss": 0.3}, {"accuracy": 0.8})
    assert guarded.result.withheld == (
        "train metrics withheld: not among the project's metrics here (loss, accuracy); "
        "eval metrics withheld: not among the project's metrics here (loss, accuracy)"
    )
    assert "14 train metric(s) withheld: not among the project's metrics here" in guarded.stripped  # the site's own
    assert "age_" not in " ".join(guarded.stripped) and "v1" not in guarded.result.withheld
    forged = check(_honest(withheld="free text from the task"))
    assert forged.result.withheld == ""  # only the guard writes it


def test_metric_with_disallowed_name_is_removed_without_echoing_it() -> None:
    names = ["age=63,sex=1", "x" * 41, "1abc", "loss\n"]
    guarded = check(_honest(train_metrics={**{n: 1.5 for n in names}, "loss": 0.3}))
    assert guarded.result.train_metrics == {"loss": 0.3}
    text = " ".join(guarded.stripped)
    assert "age" not in text and "63" not in text and "x" * 41 not in text and "1abc" not in text
    assert "4 train metric(s) with a disallowed name removed" in guarded.stripped


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), True, np.bool_(False), "0.5", None])
def test_non_finite_bool_and_non_number_metrics_are_removed(value: object) -> None:
    guarded = check(_honest(eval_metrics={"accuracy": 0.8, "odd": value}))
    assert guarded.result.eval_metrics == {"accuracy": 0.8}
    assert guarded.stripped == ["eval metric 'odd' removed: not a finite number"]


def test_numpy_and_int_metrics_leave_as_plain_floats() -> None:
    out = check(_honest(eval_metrics={"auc": np.float32(0.5), "epochs": 3})).result
    assert out.eval_metrics == {"auc": 0.5, "epochs": 3.0}
    assert all(type(v) is float for v in out.eval_metrics.values())


def test_small_counts_are_suppressed_but_large_counts_and_rates_kept() -> None:
    metrics = {"n_positive": 3.0, "num_cases": 12.0, "accuracy": 1.0, "positive_count": 9, "total": 0.0}
    guarded = check(_honest(eval_metrics=metrics))
    assert guarded.result.eval_metrics == {"num_cases": 12.0, "accuracy": 1.0, "total": 0.0}
    assert "eval metric 'n_positive' suppressed: a count below the threshold of 10" in guarded.stripped
    assert len(guarded.stripped) == 2 and not any("3" in s or "9" in s for s in guarded.stripped)


def test_few_training_rows_suppress_params_train_metrics_and_count() -> None:
    guarded = check(_honest(num_train=5))
    out = guarded.result
    assert out.status == "suppressed" and out.error_where == "fewer than 10 training rows at this site"
    assert out.params == {} and out.train_metrics == {} and out.num_train == 0
    assert out.eval_metrics == {"accuracy": 0.8, "auc": 0.7} and out.num_test == 30
    assert any("fewer than 10 rows" in s for s in guarded.stripped)


def test_training_rows_at_the_threshold_pass() -> None:
    out = check(_honest(num_train=THRESHOLD, num_test=THRESHOLD)).result
    assert out.status == "ok" and out.num_train == THRESHOLD and out.num_test == THRESHOLD and out.params


def test_few_test_rows_suppress_eval_metrics_only() -> None:
    out = check(_honest(num_test=5)).result
    assert out.eval_metrics == {} and out.num_test == 0
    assert out.status == "ok" and out.train_metrics and out.params and out.num_train == 120


def test_few_training_rows_keep_an_error_status() -> None:
    out = check(_honest(status="error", error_type="ValueError", error_where="train()", num_train=5)).result
    assert (out.status, out.error_type, out.error_where) == ("error", "ValueError", "train()")


@pytest.mark.parametrize("count", [-1, 12.5, True, "12", [3], 10**9])
def test_a_claimed_training_count_that_is_not_one_of_the_splits_rows_is_the_agents_own(count: object) -> None:
    guarded = check(_honest(num_train=count))
    assert guarded.result.num_train == KNOWN.train_rows
    assert guarded.stripped == ([] if count == 10**9 else ["train count removed: not a non-negative whole number"])


def test_free_text_in_errors_is_replaced() -> None:
    result = _honest(
        status="error",
        params={},
        error_type="Patient 63 has diabetes",
        error_line=7,
        error_where="ValueError: patient 63 at site A has diabetes",
    )
    out = check(result).result
    assert (out.error_type, out.error_where, out.error_line) == ("Exception", "the task", 7)
    assert check(_honest(status="error", error_line=41)).result.error_line == 0  # past the cell's 40 lines


@pytest.mark.parametrize(
    ("claimed", "told"),
    [
        (("ValueError", "train()"), ("ValueError", "train()")),
        (("OutOfMemoryError", "evaluate()"), ("OutOfMemoryError", "evaluate()")),
        (("MemoryLimit", "the cell"), ("MemoryLimit", "the cell")),
        (("torch.cuda.OutOfMemoryError", "build_model()"), ("Exception", "build_model()")),
        (("ValueError.LEAK42", "train()"), ("Exception", "train()")),
        (("KeyError", "the site agent"), ("KeyError", "the task")),
        (
            ("BadReturn", "evaluate() (must return a dict of numbers)"),
            ("BadReturn", "evaluate() (must return a dict of numbers)"),
        ),
        (("BadReturn", "train() (rows: 1,2,3)"), ("BadReturn", "train() (must return a dict of numbers)")),
        (
            ("TimeLimit", "the task process (stopped at its time limit of 42 s)"),
            ("TimeLimit", "the task process (stopped at its time limit of 0 s)"),
        ),
        (
            ("DatasetUnavailable", "dataset 'x' at site 'A': /srv/data/x.csv is gone"),
            ("DatasetUnavailable", "the site's dataset (it could not be read: the site's log says why)"),
        ),
        ((["ValueError"], {"x": 1}), ("Exception", "the task")),
    ],
)
def test_a_failure_is_told_in_the_vocabulary_only(claimed: tuple[object, object], told: tuple[str, str]) -> None:
    result = _honest(status="error", params={}, error_type=claimed[0], error_where=claimed[1], error_line=3)
    out = check(result).result
    assert (out.status, out.error_type, out.error_where) == ("error", *told)
    assert out.error_line == (3 if told[1] in ("train()", "evaluate()", "build_model()", "the cell", "the task") else 0)


def test_a_memory_limit_is_the_agents_sentence_or_a_phase_and_a_line_never_a_message() -> None:
    sentence = "the task process (its processes together passed A's memory limit for a run)"
    known = Known(site="A", lines=40, failures={"MemoryLimit": (sentence,)})

    def told(where: str) -> tuple[str, str, int]:
        result = _honest(status="error", params={}, error_type="MemoryLimit", error_where=where, error_line=3)
        out = guard(result, DECLARED, THRESHOLD, known).result
        return (out.error_type, out.error_where, out.error_line)

    assert told(sentence) == ("MemoryLimit", sentence, 0)  # the cgroup ended a process: the agent says so
    assert told("train()") == ("MemoryLimit", "train()", 3)  # the cell met the limit: where it did
    assert told("train() (held 1536 MiB)") == ("MemoryLimit", "the task", 3)


@pytest.mark.parametrize("status", ["suppressed", "refused", "pending", "no-dataset"])
def test_a_status_only_the_agent_may_set_is_an_error_when_a_task_process_claims_it(status: str) -> None:
    out = check(_honest(status=status, error_where="fewer than 10 training rows at this site")).result
    assert (out.status, out.error_type, out.error_where, out.params) == ("error", "Exception", "the task", {})
    assert (
        check(
            _honest(status="no-dataset"),
        ).result.status
        == "error"
    )  # it holds the dataset
    gone = guard(_honest(status="no-dataset"), DECLARED, THRESHOLD, Known(site="A", holds_dataset=False))
    assert gone.result.status == "no-dataset"


def test_input_is_not_mutated() -> None:
    result = _honest(
        num_train=5,
        num_test=5,
        eval_metrics={"age=63": 1.0, "n_pos": 2.0, "bad": float("nan")},
        status="error",
        error_where="free text",
    )
    before = copy.deepcopy(result)
    check(result)
    for name in ("status", "train_metrics", "num_train", "num_test", "error_where", "error_type", "site"):
        assert getattr(result, name) == getattr(before, name)
    assert np.isnan(result.eval_metrics["bad"]) and set(result.eval_metrics) == set(before.eval_metrics)
    assert set(result.params) == set(before.params)
    assert all(np.array_equal(result.params[k], before.params[k]) for k in before.params)
    bad = _honest(params={"fc.weight": np.zeros((3, 2), dtype=np.float32)})
    check(bad)
    assert bad.status == "ok" and bad.params["fc.weight"].shape == (3, 2)


def test_describe_outgoing_has_names_and_shapes_but_no_values() -> None:
    planted = 123456.789
    params = {"fc.weight": np.full((1, 13), planted, dtype=np.float32), "fc.bias": np.full(1, planted, np.float32)}
    out = check(_honest(params=params, train_metrics={"loss": planted}, eval_metrics={"auc": planted})).result
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
        "projects": [],
    }
    assert announced({**summary, "rows": 200, "train_rows": 160, "test_rows": 40}, 10)["train_rows"] == 160


def test_the_fields_the_agent_knows_are_its_own_whatever_the_task_process_claims() -> None:
    forged = _honest(
        site="LEAK",
        device="cuda:42",
        threads=42,
        fingerprint="sha256:42",
        seconds=42.0,
        version="42",
        private=True,
        dp_epsilon=42.0,
        dp_project_epsilon=42.0,
        withheld="42 rows",
        gpu_peak_bytes=42,
        gpu_seconds=42.0,
    )
    known = Known(
        site="VA",
        device="cpu",
        threads=1,
        fingerprint="sha256:catalog",
        seconds=2.5,
        train_rows=120,
        test_rows=30,
        lines=40,
    )
    out = guard(forged, DECLARED, THRESHOLD, known).result
    assert (out.site, out.device, out.threads, out.fingerprint, out.seconds) == ("VA", "cpu", 1, "sha256:catalog", 2.5)
    assert (out.version, out.private, out.dp_epsilon, out.dp_project_epsilon, out.withheld) == (
        StepResult(site="x", status="ok").version,
        False,
        0.0,
        0.0,
        "",
    )
    assert (out.gpu_peak_bytes, out.gpu_seconds) == (0, 0.0)  # a CPU site: no GPU figures at all


def test_the_rows_are_the_splits_and_a_training_step_may_weigh_its_update_by_fewer() -> None:
    known = Known(site="A", train_rows=120, test_rows=30, lines=40)
    trained = guard(_honest(num_train=57, num_test=29), DECLARED, THRESHOLD, known).result
    assert (trained.num_train, trained.num_test) == (57, 30)  # num_examples kept; the test rows are the split's
    evaluated = guard(_honest(params={}, num_train=57, num_test=29), DECLARED, THRESHOLD, known).result
    assert (evaluated.num_train, evaluated.num_test) == (120, 30)  # no update to weigh: the split's own
    assert guard(_honest(num_train=121), DECLARED, THRESHOLD, known).result.num_train == 120
    assert guard(_honest(num_train=0), DECLARED, THRESHOLD, known).result.num_train == 120
    cohort = Known(site="A", train_rows=50, test_rows=50, exact=False)
    assert (lambda r: (r.num_train, r.num_test))(guard(_honest(num_test=70), DECLARED, THRESHOLD, cohort).result) == (
        50,
        50,
    )


def test_only_declared_metric_names_leave_and_the_sentence_says_neither_which_nor_how_many() -> None:
    declared = Declared.from_params(_model(), metrics=("loss", "accuracy"))
    rows = {f"age_{i}": 60.0 + i for i in range(7)}
    guarded = guard(
        _honest(train_metrics={"loss": 0.3, **rows, "LEAK" * 20: 1.0}, eval_metrics={"accuracy": 0.8}),
        declared,
        THRESHOLD,
        KNOWN,
    )
    out = guarded.result
    assert (out.train_metrics, out.eval_metrics) == ({"loss": 0.3}, {"accuracy": 0.8})
    assert out.withheld == (
        "train metrics withheld: not declared when the run was submitted (declare them with --metrics)"
    )
    assert "8 train metric(s) withheld: not declared" in guarded.stripped  # counted in the site's audit only
    narrowed = guard(
        _honest(eval_metrics={"accuracy": 0.8, "auc": 0.7}), declared, THRESHOLD, KNOWN, metrics=("auc",)
    ).result
    assert narrowed.eval_metrics == {}  # the site's list narrows the declared names: auc was never declared


@pytest.mark.parametrize(("claimed", "coarse"), [(1, 1 << 20), ((1 << 30) + 1, 1 << 31), (0, 0), ("LEAK", 0)])
def test_gpu_figures_are_coarsened_to_a_power_of_two_and_whole_seconds_within_the_step(
    claimed: object, coarse: int
) -> None:
    known = Known(site="A", device="cuda:0", seconds=3.4, train_rows=120, test_rows=30)
    out = guard(_honest(gpu_peak_bytes=claimed, gpu_seconds=9.7), DECLARED, THRESHOLD, known).result
    assert (out.gpu_peak_bytes, out.gpu_seconds) == (coarse, 3.0)


def test_a_private_result_keeps_no_metric_count_sentence_or_gpu_figure_and_whole_seconds() -> None:
    known = Known(site="A", device="cuda:0", seconds=3.6, train_rows=120, test_rows=30)
    out = guard(_honest(gpu_peak_bytes=5000, withheld="x"), DECLARED, THRESHOLD, known).result
    private = private_result(out)
    assert private.private and private.train_metrics == private.eval_metrics == {}
    assert (private.num_train, private.num_test, private.withheld, private.seconds) == (0, 0, "", 4.0)
    assert (private.gpu_peak_bytes, private.gpu_seconds, private.device) == (0, 0.0, "cuda:0")
    assert private.params is out.params


def test_the_declared_names_are_the_requests_or_else_those_its_source_returns() -> None:
    from flip_core.protocol import StepRequest

    source = (
        'def train(m, d, c):\n    return {"loss": 1, "num_examples": 3}\n'
        'def evaluate(m, d, c):\n    return {"auc": 1}\n'
    )
    base = StepRequest("r", source, "h", "d", "p", "alice", 0, 1, "fit", {}, _model())
    assert Declared.from_request(base).metrics == ("loss", "auc")
    given = StepRequest(**{**base.__dict__, "metrics": ["accuracy", "not a name"]})
    assert Declared.from_request(given).metrics == ("accuracy",)
