"""Differential privacy at the site (``site_agent.disclosure.privacy``): calibration, clipping and noise, the ledger."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from site_agent.disclosure.privacy import PrivacyLedger, epsilon, noise_multiplier, privatise


def test_the_noise_multiplier_is_the_least_that_keeps_the_run_within_its_epsilon() -> None:
    z = noise_multiplier(1.0, 1e-5, 3)
    assert epsilon([(z, 3)], 1e-5) <= 1.0
    assert epsilon([(z * 0.99, 3)], 1e-5) > 1.0  # less noise would spend more than was asked
    assert noise_multiplier(1.0, 1e-5, 12) > z  # more rounds need more noise for the same epsilon
    assert noise_multiplier(4.0, 1e-5, 3) < z
    with pytest.raises(ValueError, match="positive"):
        noise_multiplier(0.0, 1e-5, 3)


def test_releases_compose_sublinearly_but_always_grow() -> None:
    z = noise_multiplier(2.0, 1e-5, 2)
    one, two = epsilon([(z, 2)], 1e-5), epsilon([(z, 4)], 1e-5)
    assert one <= 2.0 < two < 2 * one
    assert epsilon([], 1e-5) == 0.0


def test_the_update_is_clipped_and_noised_with_the_calibrated_deviation() -> None:
    received = {"w": np.zeros(200_000, np.float32), "steps": np.array([7], np.int64)}
    trained = {"w": np.full(200_000, 3.0, np.float32), "steps": np.array([99], np.int64)}
    noiseless = privatise(trained, received, clip=1.0, z=1e-9, rng=np.random.default_rng(0))
    assert math.isclose(float(np.linalg.norm(noiseless["w"].astype(np.float64))), 1.0, rel_tol=1e-5)
    assert noiseless["steps"].tolist() == [7]  # counters leave as they came, whatever the task did to them
    noisy = privatise(trained, received, clip=0.5, z=2.0, rng=np.random.default_rng(1))
    assert noisy["w"].dtype == np.float32
    assert math.isclose(float(np.std(noisy["w"])), 2 * 0.5 * 2.0, rel_tol=0.01)  # std = 2 C z
    small = {"w": np.full(200_000, 1e-6, np.float32), "steps": np.array([7], np.int64)}
    kept = privatise(small, received, clip=1.0, z=1e-9, rng=np.random.default_rng(0))
    assert np.allclose(kept["w"], small["w"], atol=1e-8)  # an update within the clip is not scaled


def test_the_ledger_composes_a_projects_releases_across_runs(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    z = noise_multiplier(1.0, 1e-5, 2)
    assert ledger.spend("heart", 1e-5).spent == 0.0
    projected = ledger.spend("heart", 1e-5, z, 2)
    ledger.charge("heart", "run-1", 1, z)
    ledger.charge("heart", "run-1", 2, z)
    assert math.isclose(ledger.spend("heart", 1e-5).spent, projected.after)
    assert [r["run"] for r in PrivacyLedger(tmp_path).releases("heart")] == ["run-1", "run-1"]  # on disk
    assert ledger.spend("oncology", 1e-5).spent == 0.0  # per project


def test_queries_under_dp_spend_the_same_budget_as_training_runs(tmp_path: Path) -> None:
    """Each query is pure epsilon-DP: its epsilon adds to the runs' (basic composition), and a run's check sees it."""
    ledger = PrivacyLedger(tmp_path)
    ledger.charge("heart", "run-1", 1, 2.0)
    trained = ledger.spend("heart", 1e-5).spent
    ledger.charge_query("heart", "q1", 0.5)
    ledger.charge_query("heart", "q2", 0.5)
    assert ledger.spend("heart", 1e-5).spent == pytest.approx(trained + 1.0)
    assert ledger.spend("heart", 1e-5, query=0.5).after == pytest.approx(trained + 1.5)
    assert ledger.spend("heart", 1e-5, 2.0, 1).after == pytest.approx(epsilon([(2.0, 2)], 1e-5) + 1.0)
    assert ledger.run_spent("heart", "run-1", 1e-5) == pytest.approx(trained)  # a run's own: its releases only
    assert ledger.spend("other", 1e-5).spent == 0.0
