"""A mock run (``%%flip_train --mock``) runs the real cell here, on tables standing in for the sites' mocks, and
aggregates as the hub does: the run's strategy with its options, metrics weighted over the sites that report them,
FedProx's proximal term as at a site, a failure told in the hub's sentence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flip_core.aggregation import FedAvg, Params, Strategy, Update, make_strategy, strategy_for
from flip_core.errors import RunFailed
from flip_core.status import MetricPhase
from flip_magics.connection import Connection
from flip_magics.mock_images import mock_cases
from flip_magics.mock_run import MockRun
from flip_magics.task import prepare

from helpers import EVAL_LINE, TINY_CELL, image_cell

NOWHERE = Connection("http://127.0.0.1:9", "unused")  # a mock run asks the coordinator nothing


class RecordingStrategy(Strategy):
    """The strategy a run names, unchanged, keeping what each round handed it (the global model and the updates)."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner.options)
        self.inner = inner
        self.rounds: list[tuple[Params, list[Update]]] = []

    def client_config(self) -> dict[str, float]:
        return self.inner.client_config()

    def aggregate(self, current: Params, updates: list[Update]) -> Params:
        self.rounds.append((current, updates))
        return self.inner.aggregate(current, updates)


def mock_table(rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(30, 80, rows),
            "trestbps": rng.integers(90, 180, rows),
            "thalach": rng.integers(90, 200, rows),
            "num": rng.integers(0, 3, rows),
        }
    )


MOCKS = {"Alpha": mock_table(40, 1), "Beta": mock_table(70, 2)}


def mock_run(strategy: Strategy, source: str = TINY_CELL, rounds: int = 3, **config: object) -> MockRun:
    return MockRun(
        NOWHERE,
        prepare(source, seed=4),
        dict(MOCKS),
        dataset="heart-disease",
        name="mocked",
        rounds=rounds,
        seed=4,
        config=dict(config),
        strategy=strategy,
        train_fraction=0.8,
    )


def final_params(run: MockRun) -> Params:
    return {k: v.detach().numpy() for k, v in run.model.state_dict().items()}


def test_a_mock_run_with_fedyogi_aggregates_exactly_as_fedyogi_does_on_its_updates() -> None:
    config = {"server_lr": 0.05, "lr": 0.2}
    recording = RecordingStrategy(strategy_for("FedYogi", config))
    run = mock_run(recording, **config)
    run.wait(timeout=120)
    assert len(recording.rounds) == 3
    replayed, fresh = prepare(TINY_CELL, seed=4).initial, make_strategy("fedyogi", {"server_lr": 0.05})
    for current, updates in recording.rounds:
        assert [n for _, n in updates] == [32, 56]  # each site's training rows, in the sites' order
        assert all(np.array_equal(current[k], replayed[k]) for k in replayed)
        replayed = fresh.aggregate(replayed, updates)
    final = final_params(run)
    assert all(np.array_equal(final[k], replayed[k]) for k in replayed)
    plain = FedAvg().aggregate(recording.rounds[-1][0], recording.rounds[-1][1])
    assert not np.array_equal(final["weight"], plain["weight"])  # the strategy made a difference


def test_a_metric_one_site_did_not_report_is_averaged_over_the_sites_that_did() -> None:
    source = TINY_CELL.replace(
        'return {"accuracy": acc, "rows": len(y)}',
        'return {"accuracy": acc, **({"alpha_only": 0.25 + acc} if data.site == "Alpha" else {})}',
    )
    run = mock_run(FedAvg(), source, rounds=1)
    run.wait(timeout=120)
    evaluated = run.history[(run.history.phase == MetricPhase.EVALUATE) & (run.history["round"] == 0)]
    value = {(r.site, r.metric): r.value for r in evaluated.itertuples()}
    alpha, beta = value[("Alpha", "accuracy")], value[("Beta", "accuracy")]
    assert value[("global", "alpha_only")] == value[("Alpha", "alpha_only")]  # Beta's silence is not a 0
    assert ("Beta", "alpha_only") not in value
    assert value[("global", "accuracy")] == (alpha * 8 + beta * 14) / 22  # each site's test rows


def test_a_fedprox_mock_run_gives_the_cell_the_proximal_term_a_site_gives_it() -> None:
    source = TINY_CELL.replace(
        'return {"loss": loss.item()}',
        'return {"loss": loss.item(), "mu": config["proximal_mu"], "prox": data.proximal_term(model).item()}',
    )
    recording = RecordingStrategy(strategy_for("fedprox", {"proximal_mu": 0.5}))
    run = mock_run(recording, source, rounds=2, proximal_mu=0.5)
    run.wait(timeout=120)
    trained = run.history[(run.history.phase == MetricPhase.TRAIN) & (run.history.site != "global")]
    value = {(r.round, r.site, r.metric): r.value for r in trained.itertuples()}
    for round_, (current, updates) in enumerate(recording.rounds, start=1):
        for site, (params, _) in zip(sorted(MOCKS), updates, strict=True):
            expected = 0.25 * sum(float(((params[k] - current[k]) ** 2).sum()) for k in ("weight", "bias"))
            assert value[(round_, site, "mu")] == 0.5
            assert value[(round_, site, "prox")] == pytest.approx(expected, rel=1e-5)
            assert expected > 0


def test_a_cell_that_fails_on_a_mock_is_told_as_the_hub_tells_a_failed_step() -> None:
    failing = "    1 / (data.site != 'Beta')"
    source = TINY_CELL.replace("    X, y = _xy(data.train)\n", f"    X, y = _xy(data.train)\n{failing}\n")
    line = source.splitlines().index(failing) + 1
    run = mock_run(FedAvg(), source, rounds=1)
    with pytest.raises(RunFailed) as failed:
        run.wait(timeout=120)
    said = f"ZeroDivisionError at cell line {line} in train() on the MOCK of Beta"
    assert failed.value.reason == f"MOCK run failed: {said}"
    assert run.sites["Beta"]["status"] == "failed" and run.sites["Alpha"]["status"] == "done"


def test_a_mock_run_lets_only_the_declared_metric_names_through_and_says_so_as_a_site_would() -> None:
    run = MockRun(
        NOWHERE,
        prepare(TINY_CELL, seed=4),
        dict(MOCKS),
        dataset="heart-disease",
        name="declared",
        rounds=1,
        seed=4,
        config={},
        strategy=FedAvg(),
        train_fraction=0.8,
        metrics=("loss", "accuracy"),
    )
    run.wait(timeout=120)
    assert set(run.history.metric) == {"loss", "accuracy"}  # evaluate()'s "rows" was never declared
    said = {e["site"]: e.get("detail") for e in list(run.events) if e.get("status") == "done"}
    expected = "eval metrics withheld: not declared when the run was submitted (declare them with --metrics)"
    assert said == {"Alpha": expected, "Beta": expected}


def imaging_run(source: str) -> MockRun:
    """The cell over two sites' imaging mocks of 28 x 28 grey PNGs, written here as a mock run's are."""
    form = {"kind": "png", "dtype": "uint8", "shape": [28, 28], "spacing": None, "share": 1.0}
    cases = {}
    for site, count in (("Alpha", 20), ("Beta", 30)):
        frame = pd.DataFrame({"label": [i % 2 for i in range(count)], "patient_id": [f"m{i}" for i in range(count)]})
        images = {"forms": [form], "form": [0] * count, "keys": ["label", "patient_id"], "intensity": []}
        cases[site] = mock_cases(site, "breast-mock", frame, images)
    return MockRun(
        NOWHERE,
        prepare(source, seed=1),
        cases,
        dataset="breast-mock",
        name="imaging",
        rounds=2,
        seed=1,
        config={},
        strategy=FedAvg(),
        train_fraction=0.8,
    )


def test_a_monai_cell_runs_on_imaging_mocks_through_data_cached_and_the_device_as_at_a_site() -> None:
    run = imaging_run(image_cell(28 * 28))
    run.wait(timeout=120)
    trained = run.history[(run.history.phase == MetricPhase.TRAIN) & (run.history.metric == "pixels")]
    assert set(trained.value) == {784.0} and len(trained) == 6  # two rounds, two sites and their global row
    assert run.record.mock_rows == {"Alpha": 20, "Beta": 30}


def test_a_cell_sized_for_other_images_fails_on_the_imaging_mock_with_torchs_sentence_and_its_line() -> None:
    source = image_cell(128)
    run = imaging_run(source)
    with pytest.raises(RunFailed) as failed:
        run.wait(timeout=120)
    line = source.splitlines().index(EVAL_LINE) + 1
    said = f"RuntimeError at cell line {line} in evaluate() on the MOCK of Alpha"
    assert failed.value.reason == f"MOCK run failed: {said}"
    assert "mat1 and mat2 shapes cannot be multiplied" in run.traceback
    assert EVAL_LINE.strip() in run.traceback and 'File "<flip-cell>"' in run.traceback.splitlines()[1]
