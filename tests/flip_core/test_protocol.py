from __future__ import annotations

import numpy as np

from flip_core.protocol import StepRequest, StepResult, decode_request, decode_result, encode_request, encode_result


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
