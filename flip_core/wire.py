"""How a task step and its result travel inside Flower messages.

Both the ServerApp (hub side) and the site's fleet client use these functions, so the format
lives in one place. A message's content is one record holding the step (or result) as the
bytes of ``flip_core.protocol`` (a JSON header and an ``.npz`` of the arrays): Flower moves
every record and array as its own content-addressed object, one SuperLink call each, so one
record per message keeps a round at three objects per message.

A payload up to ``INLINE_LIMIT`` rides in the message's ``ConfigRecord``. A larger one (a model)
would cross the SuperLink as hundreds of 5 MB objects with copies at every layer, so the message
carries only its SHA-256 and size, and the bytes move beside it over the hub's fleet address
(``flip_core.bulk``): the sender ``publish``es them before the message leaves, the receiver
``fetch``es them and they are checked against the hash before anything reads them. The message
itself, its type, its destination and its reply still travel through the SuperLink as before.
The site agent hands the bytes to the task process as they came, without decoding the arrays.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import ConfigRecord, RecordDict

from flip_core.bulk import BulkError, digest, verified
from flip_core.protocol import StepRequest, StepResult, decode_result, encode_request, encode_result

MESSAGE_TYPE_TRAIN = "train"
MESSAGE_TYPE_EVALUATE = "evaluate"
RECORD = "flip"
KEY = "step"
BULK = "sha256"  # a payload beside the message: its SHA-256 ...
SIZE = "size"  # ... and its length in bytes
INLINE_LIMIT = 1 << 20  # bytes; above this the payload travels beside the message (``flip_core.bulk``)

Blob = bytes | bytearray
Publish = Callable[[Blob, str], None]  # (payload, its SHA-256): make it fetchable before the message leaves
Fetch = Callable[[str, int], Blob]  # (SHA-256, size): the payload's bytes (checked again here)


def blob_to_content(blob: Blob, publish: Publish | None = None) -> RecordDict:
    """The message content for ``blob``: inline when small, else a reference after ``publish`` has put it."""
    if len(blob) <= INLINE_LIMIT:
        return RecordDict({RECORD: ConfigRecord({KEY: bytes(blob)})})
    if publish is None:
        raise BulkError(f"a payload of {len(blob)} bytes needs a bulk path, and this sender has none")
    sha = digest(blob)
    publish(blob, sha)
    return RecordDict({RECORD: ConfigRecord({BULK: sha, SIZE: len(blob)})})


def bulk_reference(content: RecordDict) -> tuple[str, int] | None:
    """(SHA-256, size) of the payload a message refers to; None when the payload is inline."""
    record = content.get(RECORD)
    if isinstance(record, ConfigRecord) and BULK in record:
        return str(record[BULK]), int(record[SIZE])  # type: ignore[arg-type]
    return None


def payload_size(content: RecordDict) -> int:
    """The bytes of a message's payload, inline or beside it (what the site table shows per round)."""
    reference = bulk_reference(content)
    if reference is not None:
        return reference[1]
    record = content.get(RECORD)
    return len(record[KEY]) if isinstance(record, ConfigRecord) and KEY in record else 0  # type: ignore[arg-type]


def content_to_blob(content: RecordDict, fetch: Fetch | None = None) -> Blob:
    """The payload of a FLIP message: inline, or fetched with ``fetch`` and checked against its SHA-256."""
    record = content.get(RECORD)
    if not isinstance(record, ConfigRecord) or (KEY not in record and BULK not in record):
        raise ValueError(f"not a FLIP message: no {RECORD!r} record in it")
    reference = bulk_reference(content)
    if reference is None:
        return bytes(record[KEY])  # type: ignore[arg-type]
    if fetch is None:
        raise BulkError("this message's payload travels beside it, and this receiver has no bulk path")
    sha, size = reference
    blob = fetch(sha, size)
    verified(blob, sha, size)  # whatever fetched it: nothing reads bytes its message does not name
    return blob


def request_to_content(request: StepRequest, publish: Publish | None = None) -> RecordDict:
    return blob_to_content(encode_request(request), publish)


def result_to_content(result: StepResult, publish: Publish | None = None) -> RecordDict:
    return blob_to_content(encode_result(result), publish)


def content_to_result(content: RecordDict, fetch: Fetch | None = None) -> StepResult:
    return decode_result(content_to_blob(content, fetch))
