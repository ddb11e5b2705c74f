from __future__ import annotations

import numpy as np

from flip_core.protocol import (
    RESULT_ROOM,
    StepRequest,
    StepResult,
    decode_request,
    decode_result,
    encode_request,
    encode_result,
    header_room,
)


def test_request_round_trips_through_bytes() -> None:
    req = StepRequest(
        run_id="r",
        source="x = 1\n",
        source_hash="h",
        dataset="d",
        project="p",
        researcher="a",
        seed=1,
        round=2,
        phase="fit",
        config={"lr": 0.1, "name": "x"},
        params={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
    )
    back = decode_request(encode_request(req))
    assert back.config == req.config and back.round == 2
    assert np.array_equal(back.params["w"], req.params["w"]) and back.params["w"].dtype == np.float32


def test_result_round_trips_through_bytes() -> None:
    res = StepResult(site="A", status="ok", params={"b": np.ones(2)}, train_metrics={"loss": 0.5}, num_train=3)
    back = decode_result(encode_result(res))
    assert back.train_metrics == {"loss": 0.5} and back.num_train == 3 and np.array_equal(back.params["b"], [1, 1])


def test_a_request_carries_its_declared_metric_names() -> None:
    req = StepRequest("r", "x = 1\n", "h", "d", "p", "a", 1, 2, "fit", {}, {}, metrics=["loss", "auc"])
    assert decode_request(encode_request(req)).metrics == ["loss", "auc"]
    assert (
        decode_request(encode_request(StepRequest("r", "x", "h", "d", "p", "a", 1, 2, "fit", {}, {}))).metrics is None
    )


def test_results_with_room_are_the_same_size_whatever_their_header_says() -> None:
    params = {"w": np.ones(5, np.float32)}
    short = StepResult(site="A", status="ok", params=params)
    long = StepResult(site="A", status="ok", params=params, train_metrics={f"m{i}": 0.125 for i in range(20)})
    a, b = encode_result(short, reserve=100), encode_result(long, reserve=100)
    assert len(a) == len(b) and header_room(a) == header_room(b) == RESULT_ROOM
    assert len(encode_result(short)) < len(a)  # without room, the header as it is
    assert decode_result(b).train_metrics == long.train_metrics
