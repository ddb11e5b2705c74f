"""A task step and its result as plain data, and their byte encoding between site processes.

Light on purpose (json, numpy): the site agent imports this, not torch or pandas. Bytes are a
JSON header and an ``.npz`` of the arrays (``allow_pickle=False``), so
nothing executable travels between the hub, the site agent and the task process.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

PHASE_PREPARE = "prepare"  # start the run's task process (cell, split) and evaluate the initial model
PHASE_FIT = "fit"  # evaluate the incoming global model (from round 2: prepare evaluated round 1's), then train
PHASE_EVALUATE = "evaluate"
VERSION = "0.1.0"


@dataclass(frozen=True)
class StepRequest:
    """One step of a task at one site."""

    run_id: str
    source: str
    source_hash: str
    dataset: str
    project: str
    researcher: str
    seed: int
    round: int
    phase: str
    config: dict[str, Any]
    params: dict[str, np.ndarray]


@dataclass
class StepResult:
    """What a step produced. ``status`` is "ok", "error" or "no-dataset"."""

    site: str
    status: str
    params: dict[str, np.ndarray] = field(default_factory=dict)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0
    error_type: str = ""
    error_line: int = 0
    error_where: str = ""
    fingerprint: str = ""
    version: str = VERSION
    seconds: float = 0.0
    private: bool = False  # a differential-privacy run: noised parameters only, no metrics or counts
    dp_epsilon: float = 0.0  # this run's epsilon spent at this site so far
    dp_project_epsilon: float = 0.0  # the project's epsilon spent at this site, all runs
    withheld: str = ""  # what the site's policy kept back, in fixed sentences the researcher may read


def normalise_source(source: str) -> str:
    """The cell source as hashed for approval: LF endings, no trailing spaces or blank edges."""
    lines = [line.rstrip() for line in source.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def source_hash(source: str) -> str:
    return "sha256:" + hashlib.sha256(normalise_source(source).encode()).hexdigest()


def _encode(fields_: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    head = json.dumps(fields_).encode()
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return struct.pack("<Q", len(head)) + head + buffer.getvalue()


def header(blob: bytes) -> dict[str, Any]:
    """The JSON header of an encoded step or result, without touching its arrays."""
    (size,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + size])  # type: ignore[no-any-return]


def _decode(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (size,) = struct.unpack_from("<Q", blob)
    head = json.loads(blob[8:8 + size])
    with np.load(io.BytesIO(blob[8 + size:]), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    return head, arrays


def encode_request(request: StepRequest) -> bytes:
    head = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "params"}
    return _encode(head, request.params)


def decode_request(blob: bytes) -> StepRequest:
    head, arrays = _decode(blob)
    return StepRequest(params=arrays, **head)


def encode_result(result: StepResult) -> bytes:
    head = {k: v for k, v in asdict(result).items() if k != "params"}
    return _encode(head, result.params)


def decode_result(blob: bytes) -> StepResult:
    head, arrays = _decode(blob)
    return StepResult(params=arrays, **head)
