"""Behaviour tests for flip_core.aggregation (weighted mean, strategies, metrics, a run's strategy)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flip_core.aggregation import (
    STRATEGIES,
    FedAdam,
    FedYogi,
    make_strategy,
    strategy_for,
    strategy_options,
    weighted_mean,
    weighted_metrics,
)
from flip_core.errors import RequestInvalid


def _params(w, b, steps=0):
    return {
        "layer.weight": np.asarray(w, dtype=np.float32),
        "layer.bias": np.asarray(b, dtype=np.float32),
        "bn.num_batches_tracked": np.asarray(steps, dtype=np.int64),
    }


def test_weighted_mean_matches_hand_computation_and_keeps_dtypes():
    a = _params([[1.0, 2.0]], [0.0], steps=10)
    b = _params([[3.0, 6.0]], [4.0], steps=13)
    out = weighted_mean([(a, 1), (b, 3)])
    # (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5.0, (0 + 12)/4 = 3.0, (10 + 39)/4 = 12.25 -> 12
    np.testing.assert_allclose(out["layer.weight"], [[2.5, 5.0]])
    np.testing.assert_allclose(out["layer.bias"], [3.0])
    assert out["bn.num_batches_tracked"] == 12
    assert out["layer.weight"].dtype == np.float32
    assert out["bn.num_batches_tracked"].dtype == np.int64
    assert list(out) == ["layer.weight", "layer.bias", "bn.num_batches_tracked"]


def test_weighted_mean_rounds_integer_arrays():
    out = weighted_mean([({"n": np.array([1, 2], dtype=np.int32)}, 1), ({"n": np.array([2, 9], dtype=np.int32)}, 3)])
    # 1.75 -> 2, 7.25 -> 7
    assert out["n"].tolist() == [2, 7]
    assert out["n"].dtype == np.int32


def test_weighted_mean_ignores_zero_weight_update_values():
    out = weighted_mean([({"x": np.array([1.0])}, 0), ({"x": np.array([5.0])}, 2)])
    assert out["x"].tolist() == [5.0]


def test_weighted_mean_rejects_empty_negative_and_zero_total():
    with pytest.raises(ValueError, match="empty"):
        weighted_mean([])
    with pytest.raises(ValueError, match="weight -1"):
        weighted_mean([({"x": np.zeros(1)}, 2), ({"x": np.zeros(1)}, -1)])
    with pytest.raises(ValueError, match="total weight"):
        weighted_mean([({"x": np.zeros(1)}, 0), ({"x": np.zeros(1)}, 0)])


def test_weighted_mean_shape_mismatch_names_the_array_and_shapes():
    a = _params([[1.0, 2.0]], [0.0])
    b = _params([[1.0, 2.0, 3.0]], [0.0])
    with pytest.raises(ValueError) as info:
        weighted_mean([(a, 1), (b, 1)])
    message = str(info.value)
    assert "'layer.weight'" in message
    assert "(1, 3)" in message and "(1, 2)" in message


def test_weighted_mean_name_mismatch_lists_missing_and_extra():
    with pytest.raises(ValueError) as info:
        weighted_mean([({"a": np.zeros(1), "b": np.zeros(1)}, 1), ({"a": np.zeros(1), "c": np.zeros(1)}, 1)])
    assert "['b']" in str(info.value) and "['c']" in str(info.value)


def test_fedavg_and_fedprox_return_weighted_mean_and_client_config():
    current = _params([[0.0, 0.0]], [0.0])
    updates = [(_params([[1.0, 2.0]], [0.0]), 1), (_params([[3.0, 6.0]], [4.0]), 3)]
    expected = weighted_mean(updates)
    for name in ("fedavg", "fedprox"):
        out = make_strategy(name, {}).aggregate(current, updates)
        for key in expected:
            np.testing.assert_array_equal(out[key], expected[key])
    assert make_strategy("fedavg", {}).client_config() == {}
    assert make_strategy("fedprox", {}).client_config() == {"proximal_mu": 0.01}
    assert make_strategy("fedprox", {"proximal_mu": 0.5}).client_config() == {"proximal_mu": 0.5}
    assert make_strategy("fedadam", {}).client_config() == {}


def test_strategy_rejects_current_with_different_shape():
    current = {"w": np.zeros(3)}
    with pytest.raises(ValueError, match="'w'"):
        make_strategy("fedadam", {}).aggregate(current, [({"w": np.zeros(2)}, 1)])


def test_fedadam_first_step_matches_hand_computation():
    current = {"w": np.array([1.0, -2.0]), "steps": np.array(4, dtype=np.int64)}
    updates = [
        ({"w": np.array([2.0, -2.0]), "steps": np.array(6)}, 1),
        ({"w": np.array([4.0, -1.0]), "steps": np.array(8)}, 1),
    ]
    strategy = make_strategy("fedadam", {})
    out = strategy.aggregate(current, updates)
    # mean = [3, -1.5]; delta = [2, 0.5]; m = 0.1*delta; v = 0.01*delta^2
    # new = current + 0.1 * m / (sqrt(v) + 1e-9) = current + 0.1 * sign(delta) (approx.)
    delta = np.array([2.0, 0.5])
    m, v = 0.1 * delta, 0.01 * delta**2
    expected = current["w"] + 0.1 * m / (np.sqrt(v) + 1e-9)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-12)
    np.testing.assert_allclose(out["w"], [1.1, -1.9], rtol=1e-7)
    assert out["steps"] == 7  # non-floating arrays take the weighted mean
    assert out["steps"].dtype == np.int64


def test_fedadam_state_persists_across_rounds():
    strategy = FedAdam({"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.0})
    current = {"w": np.array([0.0])}
    current = strategy.aggregate(current, [({"w": np.array([2.0])}, 1)])
    # round 1: delta=2, m=1, v=2, new = 0 + 1/sqrt(2)
    np.testing.assert_allclose(current["w"], [1 / math.sqrt(2)])
    second = strategy.aggregate(current, [({"w": np.array([1 / math.sqrt(2)])}, 1)])
    # round 2: delta=0, m=0.5, v=1, new = w + 0.5
    np.testing.assert_allclose(second["w"], [1 / math.sqrt(2) + 0.5])
    # a fresh object has no momentum, so the same round-2 input leaves w where it is
    fresh = FedAdam({"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 1e-9})
    fresh_out = fresh.aggregate(current, [({"w": np.array([1 / math.sqrt(2)])}, 1)])
    np.testing.assert_allclose(fresh_out["w"], current["w"])


def test_fedyogi_matches_hand_computation_and_differs_from_fedadam():
    options = {"server_lr": 1.0, "beta1": 0.5, "beta2": 0.5, "tau": 0.1}
    adam, yogi = FedAdam(options), FedYogi(options)
    current = {"w": np.array([0.0])}
    updates = [({"w": np.array([2.0])}, 1)]
    a1, y1 = adam.aggregate(current, updates), yogi.aggregate(current, updates)
    # round 1 is the same (v starts at 0): m=1, v=2 for both
    np.testing.assert_allclose(a1["w"], y1["w"])
    np.testing.assert_allclose(y1["w"], [1 / (math.sqrt(2) + 0.1)])
    updates2 = [({"w": np.array([3.0])}, 1)]
    a2, y2 = adam.aggregate(a1, updates2), yogi.aggregate(y1, updates2)
    d = 3.0 - y1["w"][0]
    m = 0.5 * 1.0 + 0.5 * d
    v_yogi = 2.0 - 0.5 * d * d * np.sign(2.0 - d * d)
    np.testing.assert_allclose(y2["w"], [y1["w"][0] + m / (math.sqrt(v_yogi) + 0.1)])
    assert not np.allclose(a2["w"], y2["w"])


def test_default_hyperparameters_match_flower():
    adam, yogi = make_strategy("fedadam", {}), make_strategy("FedYogi", {})
    assert (adam.eta, adam.beta1, adam.beta2, adam.tau) == (0.1, 0.9, 0.99, 1e-9)
    assert (yogi.eta, yogi.beta1, yogi.beta2, yogi.tau) == (0.01, 0.9, 0.99, 1e-3)
    assert make_strategy("fedadam", {"server_lr": 0.5}).eta == 0.5


def test_adaptive_update_keeps_float32_dtype():
    current = {"w": np.zeros(3, dtype=np.float32)}
    out = make_strategy("fedyogi", {}).aggregate(current, [({"w": np.ones(3, np.float32)}, 5)])
    assert out["w"].dtype == np.float32
    assert np.all(out["w"] > 0)


def test_unknown_strategy_message_lists_valid_names():
    with pytest.raises(ValueError) as info:
        make_strategy("fedsgd", {})
    message = str(info.value)
    assert "'fedsgd'" in message
    for name in STRATEGIES:
        assert name in message


def test_weighted_metrics_weights_by_count_and_skips_nan():
    results = [
        ({"accuracy": 0.5, "loss": 1.0}, 10),
        ({"accuracy": 1.0, "loss": float("nan")}, 30),
        ({"accuracy": 0.0, "auc": 0.9}, 0),
        ({"f1": float("inf")}, 5),
    ]
    out = weighted_metrics(results)
    assert out == {"accuracy": pytest.approx((0.5 * 10 + 1.0 * 30) / 40), "loss": 1.0}


def test_weighted_metrics_empty_and_negative():
    assert weighted_metrics([]) == {}
    with pytest.raises(ValueError, match="weight"):
        weighted_metrics([({"a": 1.0}, -2)])


def test_a_runs_strategy_is_built_from_its_name_and_the_options_its_config_sets():
    yogi = strategy_for("FedYogi", {"server_lr": 0.5, "tau": 1, "lr": 0.1, "note": "x"})
    assert isinstance(yogi, FedYogi) and yogi.options == {"server_lr": 0.5, "tau": 1.0}
    assert (yogi.eta, yogi.tau, yogi.beta1) == (0.5, 1.0, 0.9)
    assert strategy_options({"proximal_mu": 2, "beta1": 0.5, "epochs": 3}) == {"beta1": 0.5, "proximal_mu": 2.0}
    assert strategy_for("fedprox", {}).client_config() == {"proximal_mu": 0.01}


@pytest.mark.parametrize(
    ("name", "config", "said"),
    [
        ("fedsgd", {}, "unknown strategy 'fedsgd': use one of fedadam, fedavg, fedprox, fedyogi"),
        ("fedadam", {"server_lr": "fast"}, "--config server_lr must be a number, not 'fast'"),
        ("fedadam", {"beta1": True}, "--config beta1 must be a number, not True"),
        ("fedprox", {"proximal_mu": -1}, "--config proximal_mu must be a finite number >= 0, not -1.0"),
    ],
)
def test_a_wrong_strategy_or_option_is_refused_in_a_sentence(name, config, said):
    with pytest.raises(RequestInvalid) as refused:
        strategy_for(name, config)
    assert str(refused.value).startswith(said)
