"""The hub's side of a Cox model fitted across sites (``flip_core.cox``): Efron's terms from per-bin sums, a site's
merged bins spread onto the model's, what crosses the wire, the chi-square tail, and Newton-Raphson's stopping,
halving and counting. The fits against lifelines on real data are in tests/site_agent/queries/test_cox_site.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lifelines.datasets import load_rossi
from scipy import stats

from flip_core.cox import (
    BinSums,
    CoxInvalid,
    Statistics,
    chi2_sf,
    efron,
    efron_statistics,
    event_ranks,
    fit,
    normal_sf2,
)
from flip_core.glm import NotConverged


def sums_by_hand(bins: np.ndarray, event: np.ndarray, x: np.ndarray, beta: np.ndarray, n_bins: int) -> BinSums:
    """The sums as the definition says, one bin at a time: the risk set is the rows in the bin or later."""
    w = np.exp(x @ beta)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("d", "ex", "r0", "r1", "r2", "t0", "t1", "t2")}
    for b in range(n_bins):
        for prefix, rows in (("r", bins >= b), ("t", event & (bins == b))):
            parts[prefix + "0"].append(w[rows].sum())
            parts[prefix + "1"].append((w[rows, None] * x[rows]).sum(axis=0))
            parts[prefix + "2"].append(np.einsum("i,ia,ib->ab", w[rows], x[rows], x[rows]))
        parts["d"].append(np.float64((event & (bins == b)).sum()))
        parts["ex"].append(x[event & (bins == b)].sum(axis=0))
    a = {name: np.array(values) for name, values in parts.items()}
    return BinSums(n_bins, tuple(range(n_bins)), a["d"], a["ex"], a["r0"], a["r1"], a["r2"], a["t0"], a["t1"], a["t2"],
                   len(bins))  # fmt: skip


@pytest.fixture(scope="module")
def rossi_weeks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rossi's released prisoners (lifelines' copy): the week of arrest or of the end of follow-up as a bin
    (0..51), arrested or not, and financial aid, age and prior convictions."""
    rossi = load_rossi()
    x = rossi[["fin", "age", "prio"]].to_numpy(dtype=np.float64)
    return rossi["week"].to_numpy() - 1, rossi["arrest"].to_numpy() == 1, x


def test_efron_s_gradient_and_information_are_its_log_likelihood_s_derivatives(rossi_weeks) -> None:
    """Up to 7 arrests tie in a week: the gradient and the information (per bin, summed) are the first and minus the
    second derivatives of the log partial likelihood computed from the same sums."""
    bins, event, x = rossi_weeks
    beta = np.array([-0.3, -0.06, 0.09])

    def log_likelihood(b: np.ndarray) -> float:
        return efron(sums_by_hand(bins, event, x, b, 52), b).log_likelihood

    at = efron_statistics(sums_by_hand(bins, event, x, beta, 52), beta)
    assert at.events == 114 and at.rows == 432
    h = 1e-5
    steps = np.eye(3) * h
    numeric = np.array([(log_likelihood(beta + s) - log_likelihood(beta - s)) / (2 * h) for s in steps])
    np.testing.assert_allclose(at.gradient, numeric, rtol=1e-6, atol=1e-6)
    second = np.array([[(log_likelihood(beta + s + t) - log_likelihood(beta + s - t) - log_likelihood(beta - s + t)
                         + log_likelihood(beta - s - t)) / (4 * h * h) for t in steps] for s in steps])  # fmt: skip
    np.testing.assert_allclose(at.information, -second, rtol=1e-4)


def test_a_site_s_merged_bins_spread_onto_the_model_s_and_sum_with_another_site_s() -> None:
    """A site kept bins 1 and 3 of 5: its events stay there; at bins 0 and 1 its rows at risk are those at 1, at
    2 and 3 those at 3, after 3 none."""
    p = 1
    site = BinSums(5, (1, 3), np.array([6.0, 5.0]), np.array([[2.0], [3.0]]), np.array([20.0, 9.0]),
                   np.array([[7.0], [4.0]]), np.array([[[7.0]], [[4.0]]]), np.array([6.0, 5.0]),
                   np.array([[2.0], [3.0]]), np.array([[[2.0]], [[3.0]]]), 20)  # fmt: skip
    spread = site.expanded()
    assert spread.bins == (0, 1, 2, 3, 4)
    assert spread.events.tolist() == [0, 6, 0, 5, 0] and spread.event_x[:, 0].tolist() == [0, 2, 0, 3, 0]
    assert spread.risk0.tolist() == [20, 20, 9, 9, 0] and spread.risk2[:, 0, 0].tolist() == [7, 7, 4, 4, 0]
    assert spread.tie1[:, 0].tolist() == [0, 2, 0, 3, 0]
    other = BinSums(5, (4,), np.array([5.0]), np.ones((1, p)), np.array([8.0]), np.ones((1, p)), np.ones((1, p, p)),
                    np.array([5.0]), np.ones((1, p)), np.ones((1, p, p)), 8)  # fmt: skip
    total = site + other
    assert total.risk0.tolist() == [28, 28, 17, 17, 8] and total.events.tolist() == [0, 6, 0, 5, 5]
    assert total.rows == 28
    with pytest.raises(CoxInvalid, match="different bins or covariates"):
        _ = site + BinSums(6, (5,), *(np.asarray(getattr(other, n)) for n in _fields()), 8)


def _fields() -> tuple[str, ...]:
    return ("events", "event_x", "risk0", "risk1", "risk2", "tie0", "tie1", "tie2")


def test_what_crosses_the_wire_comes_back_the_same_and_a_malformed_one_is_refused(rossi_weeks) -> None:
    bins, event, x = rossi_weeks
    beta = np.array([-0.3, -0.06, 0.09])
    sums = sums_by_hand(bins, event, x, beta, 52)
    back = BinSums.from_dict(json.loads(json.dumps(sums.to_dict())))
    assert back.bins == sums.bins and back.rows == sums.rows
    for name in _fields():
        np.testing.assert_array_equal(getattr(back, name), getattr(sums, name))
    statistics = efron_statistics(sums, beta)
    again = Statistics.from_dict(json.loads(json.dumps(statistics.to_dict())))
    assert again.log_likelihood == statistics.log_likelihood and again.events == statistics.events == 114
    np.testing.assert_array_equal(again.information, statistics.information)
    body = sums.to_dict()
    body["risk2"] = body["risk2"][:-1]  # a bin short
    with pytest.raises(CoxInvalid, match="do not have the shapes"):
        BinSums.from_dict(body)
    body = {**sums.to_dict(), "bins": [3, 2], "events": [1.0, 1.0]}
    with pytest.raises(CoxInvalid):
        BinSums.from_dict(body).expanded()


def test_the_chi_square_and_normal_tails_are_scipy_s() -> None:
    for df in (1, 2, 3, 5, 7, 10, 30):
        for x in (1e-6, 0.01, 0.5, 1.0, 3.84, 7.0, 15.0, 40.0, 120.0):
            assert math.isclose(chi2_sf(x, df), stats.chi2.sf(x, df), rel_tol=1e-10, abs_tol=1e-300)
    assert chi2_sf(0.0, 3) == 1.0
    for z in (0.0, 0.5, 1.96, 4.0, -7.5):
        assert math.isclose(normal_sf2(z), 2 * stats.norm.sf(abs(z)), rel_tol=1e-12)


def test_event_ranks_are_the_mean_rank_of_a_bin_s_tied_events() -> None:
    assert event_ranks(np.array([2.0, 0.0, 3.0, 1.0])).tolist() == [1.5, 2.5, 4.0, 6.0]


def one_parameter(log_likelihood: float, gradient: float, information: float) -> Statistics:
    return Statistics(log_likelihood, np.array([gradient]), np.array([[information]]), 100, 20)


def test_a_step_that_lowers_the_log_likelihood_is_halved_and_every_round_trip_counted() -> None:
    """``-log cosh(b - 3)``: from zero Newton's full step lands near 100, far past the maximum at 3 (lower there),
    so it is halved; each question to the sites is one iteration."""
    asked: list[float] = []

    def ask(beta: np.ndarray) -> Statistics:
        b = float(beta[0])
        asked.append(b)
        return one_parameter(-math.log(math.cosh(b - 3)), -math.tanh(b - 3), 1 / math.cosh(b - 3) ** 2)

    result = fit(ask, ["b"])
    assert result.params[0] == pytest.approx(3.0, abs=1e-6)  # stopped at a step under 1e-7
    assert result.iterations == len(asked)
    assert any(abs(b) > 40 for b in asked)  # the full step, tried and halved
    assert result.null_log_likelihood == pytest.approx(-math.log(math.cosh(3)))
    assert result.bse[0] == pytest.approx(1.0, rel=1e-9)  # 1 / sqrt(sech^2(0))


def test_a_coefficient_going_to_infinity_or_collinear_covariates_are_not_a_fit() -> None:
    """``log sigmoid(b)`` rises for ever (a covariate separating the events): its log-likelihood settles while b
    still moves, and the fit says so; a singular information is collinear covariates."""

    def separated(beta: np.ndarray) -> Statistics:
        b = float(beta[0])
        s = 1 / (1 + math.exp(-b))
        return one_parameter(math.log(s), 1 - s, s * (1 - s))

    with pytest.raises(NotConverged, match=r"the coefficient of 'b' may be infinite"):
        fit(separated, ["b"])

    def collinear(beta: np.ndarray) -> Statistics:
        return Statistics(-10.0, np.array([1.0, 1.0]), np.ones((2, 2)), 100, 20)

    with pytest.raises(NotConverged, match="collinear"):
        fit(collinear, ["a", "b"])
