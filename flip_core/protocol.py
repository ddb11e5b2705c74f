"""A task step and its result as plain data, and their bytes between the hub, the site agent and
the task process.

Light on purpose (json, numpy): the site agent imports this, not torch or pandas. Bytes are a
frame of :mod:`flip_core.codec` (a JSON header and an ``.npz`` of the arrays, never pickled), so
nothing executable travels.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from flip_core import VERSION
from flip_core.codec import decode_frame, encode_frame, rewrite_header
from flip_core.status import Phase, StepStatus

_ROOM = struct.Struct("<Q")  # a frame's first bytes: its header's length (flip_core.codec)


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
    phase: Phase
    config: dict[str, Any]
    params: dict[str, np.ndarray]
    cohort: str = ""  # train on the rows frozen at each site under this name (``%flip_cohort``), not the whole table
    # the metric names the task declared when it was submitted: a site lets no other leave (None: a site reads them
    # from the source, as the kernel does: ``flip_core.cell.declared_metrics``)
    metrics: list[str] | None = None
    # the per-person table the task declared of an OMOP dataset (``flip_core.covariates``; part of its approved hash)
    covariates: dict[str, Any] | None = None


@dataclass
class StepResult:
    """What a step produced. As a task process sends it, every field is a claim; as a site sends it, the site agent
    built it field by field (``site_agent.disclosure.guard``): from the words of ``flip_core.vocabulary``, the
    declared model and metric names, and what the agent itself knows or measured."""

    site: str
    status: StepStatus
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
    device: str = ""  # where the step ran, the site's choice ("cpu", "cuda:0")
    gpu_peak_bytes: int = 0  # peak GPU memory torch allocated during the step (0 on a CPU)
    gpu_seconds: float = 0.0  # the step's cell calls on the GPU, wall seconds with its queue drained
    threads: int = 0  # torch's CPU threads in the step (a float reduction's bits can depend on how many)
    # a failed step's traceback as the task process wrote it: a claim the agent keeps in the site's airlock, for a
    # request that may come (``site_agent.governance.airlock``); what a site sends never has one (the guard builds
    # its result without it)
    detail: str = ""
    # the final evaluation's report (the cell's ``report()``, as JSON: site_agent.tasks.reports), likewise a claim the
    # agent keeps in the airlock and never sends
    report: str = ""


def encode_request(request: StepRequest) -> bytes:
    head = {f.name: getattr(request, f.name) for f in fields(request) if f.name != "params"}
    return encode_frame(head, request.params)


def decode_request(blob: bytes | bytearray) -> StepRequest:
    head, arrays = decode_frame(blob)
    head["phase"] = Phase(head["phase"])
    return StepRequest(params=arrays, **head)


RESULT_ROOM = 8192  # the bytes a result's header takes, padded, in a frame with room: see encode_result


def encode_result(result: StepResult, reserve: int = 0) -> bytes:
    """``reserve``: room after the header for :func:`reheader_result` (the task process leaves it, so that the
    site's output guard can set its fields without copying the parameters). A frame with room has its header padded
    to :data:`RESULT_ROOM` bytes (or more, if ``reserve`` asks it): two such frames of the same parameters are the
    same size, so the size of what leaves a site says nothing of the task's header (:func:`header_room`)."""
    head = _result_head(result)
    if reserve > 0:
        reserve = max(reserve, RESULT_ROOM - len(json.dumps(head).encode()))
    return encode_frame(head, result.params, reserve)


def header_room(frame: bytes | bytearray) -> int:
    """The bytes ``frame``'s header takes, padding included."""
    return int(_ROOM.unpack_from(frame)[0])


def reheader_result(frame: bytearray, result: StepResult) -> bool:
    """Write ``result``'s fields (not its parameters: the frame's own stay) into ``frame``'s header in place;
    False when they do not fit, and the caller encodes the result afresh."""
    return rewrite_header(frame, _result_head(result))


def _result_head(result: StepResult) -> dict[str, Any]:
    """Every field but the parameters (taken out first: ``asdict`` would deep-copy the arrays)."""
    return {k: v for k, v in asdict(replace(result, params={})).items() if k != "params"}


def decode_result(blob: bytes | bytearray) -> StepResult:
    head, arrays = decode_frame(blob)
    head["status"] = StepStatus(head["status"])
    return StepResult(params=arrays, **head)


__all__ = [
    "RESULT_ROOM",
    "StepRequest",
    "StepResult",
    "decode_request",
    "decode_result",
    "encode_request",
    "encode_result",
    "header_room",
    "reheader_result",
]
