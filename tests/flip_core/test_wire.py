"""A step and its result survive the trip through Flower records, small or large."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord

from flip_core import wire
from flip_core.codec import frame_header as header
from flip_core.protocol import StepRequest, StepResult, encode_request
from flip_core.status import Phase


def request(params: dict[str, np.ndarray]) -> StepRequest:
    return StepRequest(
        run_id="r1",
        source="x = 1\n",
        source_hash="sha256:abc",
        dataset="heart",
        project="p",
        researcher="alice",
        seed=3,
        round=2,
        phase=Phase.FIT,
        config={"lr": 0.1},
        params=params,
    )


def test_a_small_step_is_one_config_record_and_comes_back_whole() -> None:
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(1, dtype=np.float64)}
    content = wire.request_to_content(request(params))
    assert list(content) == [wire.RECORD] and isinstance(content[wire.RECORD], ConfigRecord)
    blob = wire.content_to_blob(content)
    assert header(blob)["run_id"] == "r1" and header(blob)["round"] == 2
    assert blob == encode_request(request(params))


def test_a_large_result_travels_as_array_chunks_and_comes_back_whole() -> None:
    big = np.random.default_rng(0).standard_normal(400_000).astype(np.float32)  # 1.6 MB, above the inline limit
    result = StepResult(site="VA", status="ok", params={"w": big}, train_metrics={"loss": 0.5}, num_train=10)
    content = wire.result_to_content(result)
    assert isinstance(content[wire.RECORD], ArrayRecord)
    back = wire.content_to_result(content)
    assert np.array_equal(back.params["w"], big) and back.params["w"].dtype == np.float32
    assert back.train_metrics == {"loss": 0.5} and back.site == "VA" and back.num_train == 10


def test_content_without_flips_record_is_refused() -> None:
    from flwr.app import RecordDict

    try:
        wire.content_to_blob(RecordDict({"other": ConfigRecord({"a": 1})}))
    except ValueError as exc:
        assert "not a FLIP message" in str(exc)
    else:
        raise AssertionError("accepted a foreign message")
