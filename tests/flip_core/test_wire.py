"""A step and its result survive the trip through Flower records, small or large (a large payload beside the
message, named by its SHA-256 and checked when it arrives)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import ConfigRecord

from flip_core import wire
from flip_core.bulk import BulkError
from flip_core.codec import frame_header as header
from flip_core.protocol import StepRequest, StepResult, encode_request
from flip_core.status import Phase

from fakes import FakeBulkStore


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


def test_a_large_result_travels_beside_its_message_named_by_its_hash_and_comes_back_whole() -> None:
    big = np.random.default_rng(0).standard_normal(400_000).astype(np.float32)  # 1.6 MB, above the inline limit
    result = StepResult(site="VA", status="ok", params={"w": big}, train_metrics={"loss": 0.5}, num_train=10)
    store = FakeBulkStore()
    content = wire.result_to_content(result, store.publish)
    record = content[wire.RECORD]
    assert isinstance(record, ConfigRecord) and set(record) == {wire.BULK, wire.SIZE}  # no array in the message
    ((sha, blob),) = store.held.items()
    assert sha == hashlib.sha256(blob).hexdigest() and record[wire.SIZE] == len(blob) > wire.INLINE_LIMIT
    assert wire.bulk_reference(content) == (sha, len(blob)) and wire.payload_size(content) == len(blob)
    back = wire.content_to_result(content, store.fetch)
    assert np.array_equal(back.params["w"], big) and back.params["w"].dtype == np.float32
    assert back.train_metrics == {"loss": 0.5} and back.site == "VA" and back.num_train == 10


def test_a_payload_that_is_not_the_one_its_message_names_is_refused_before_it_is_read() -> None:
    big = {"w": np.ones(400_000, dtype=np.float32)}
    store = FakeBulkStore()
    content = wire.request_to_content(request(big), store.publish)
    ((sha, blob),) = store.held.items()
    store.held[sha] = blob[:-1] + bytes([blob[-1] ^ 1])  # one bit flipped on the way
    with pytest.raises(BulkError, match="arrived altered"):
        wire.content_to_blob(content, store.fetch)
    store.held[sha] = blob[:-8]
    with pytest.raises(BulkError, match="not the .* its message names"):
        wire.content_to_blob(content, store.fetch)


def test_a_large_payload_without_a_bulk_path_is_said_not_sent_half() -> None:
    big = {"w": np.ones(400_000, dtype=np.float32)}
    with pytest.raises(BulkError, match="needs a bulk path"):
        wire.request_to_content(request(big))
    content = wire.request_to_content(request(big), FakeBulkStore().publish)
    with pytest.raises(BulkError, match="no bulk path"):
        wire.content_to_blob(content)


def test_content_without_flips_record_is_refused() -> None:
    from flwr.app import RecordDict

    try:
        wire.content_to_blob(RecordDict({"other": ConfigRecord({"a": 1})}))
    except ValueError as exc:
        assert "not a FLIP message" in str(exc)
    else:
        raise AssertionError("accepted a foreign message")
