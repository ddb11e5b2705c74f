"""How a task step and its result travel inside Flower messages.

Both the ServerApp (hub side) and the site's fleet client use these functions, so the format
lives in one place. A message's content is one record holding the step (or result) as the
bytes of ``flip_core.protocol`` (a JSON header and an ``.npz`` of the arrays): Flower moves
every record and array as its own content-addressed object, one SuperLink call each, so one
record per message keeps a round at three objects per message. Small payloads ride in a
``ConfigRecord``; large ones in an ``ArrayRecord`` of bytes, which Flower cuts into chunks.
The site agent hands the bytes to the task process as they came, without decoding the arrays.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from flip_core.protocol import StepRequest, StepResult, decode_result, encode_request, encode_result

MESSAGE_TYPE_TRAIN = "train"
MESSAGE_TYPE_EVALUATE = "evaluate"
RECORD = "flip"
KEY = "step"
INLINE_LIMIT = 1 << 20  # bytes; above this the payload travels as chunked array objects


def blob_to_content(blob: bytes) -> RecordDict:
    if len(blob) <= INLINE_LIMIT:
        return RecordDict({RECORD: ConfigRecord({KEY: blob})})
    return RecordDict({RECORD: ArrayRecord({KEY: Array(np.frombuffer(blob, dtype=np.uint8))})})


def content_to_blob(content: RecordDict) -> bytes:
    record = content.get(RECORD)
    if isinstance(record, ConfigRecord):
        return bytes(record[KEY])  # type: ignore[arg-type]
    if isinstance(record, ArrayRecord):
        return record[KEY].numpy().tobytes()
    raise ValueError(f"not a FLIP message: no {RECORD!r} record in it")


def request_to_content(request: StepRequest) -> RecordDict:
    return blob_to_content(encode_request(request))


def result_to_content(result: StepResult) -> RecordDict:
    return blob_to_content(encode_result(result))


def content_to_result(content: RecordDict) -> StepResult:
    return decode_result(content_to_blob(content))
