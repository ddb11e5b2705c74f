"""How a task step and its result travel inside Flower messages.

Both the ServerApp (hub side) and the ClientApp (site side) use these functions, so the
format lives in one place. A step is a ``ConfigRecord`` named "task" plus an ``ArrayRecord``
named "params"; a result is a ``ConfigRecord`` "result", two ``MetricRecord``s and the
trained "params".
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from site_agent.protocol import StepRequest, StepResult

MESSAGE_TYPE_TRAIN = "train"
MESSAGE_TYPE_EVALUATE = "evaluate"


def _arrays(params: dict[str, np.ndarray]) -> ArrayRecord:
    record = ArrayRecord()
    for name, value in params.items():
        record[name] = Array(np.ascontiguousarray(value))
    return record


def _ndarrays(record: ArrayRecord | None) -> dict[str, np.ndarray]:
    if record is None:
        return {}
    return {name: array.numpy() for name, array in record.items()}


def request_to_content(request: StepRequest) -> RecordDict:
    task = ConfigRecord({
        "run_id": request.run_id, "source": request.source, "source_hash": request.source_hash,
        "dataset": request.dataset, "project": request.project, "researcher": request.researcher,
        "seed": request.seed, "round": request.round, "phase": request.phase,
        "config": json.dumps(request.config, sort_keys=True),
    })
    return RecordDict({"task": task, "params": _arrays(request.params)})


def content_to_request(content: RecordDict) -> StepRequest:
    task = content.config_records["task"]
    return StepRequest(
        run_id=str(task["run_id"]), source=str(task["source"]),
        source_hash=str(task["source_hash"]), dataset=str(task["dataset"]),
        project=str(task["project"]), researcher=str(task["researcher"]),
        seed=int(task["seed"]), round=int(task["round"]), phase=str(task["phase"]),
        config=json.loads(str(task["config"])),
        params=_ndarrays(content.array_records.get("params")),
    )


_RESULT_FIELDS = ("site", "status", "num_train", "num_test", "error_type", "error_line",
                  "error_where", "fingerprint", "version", "seconds")


def result_to_content(result: StepResult) -> RecordDict:
    fields: dict[str, Any] = {name: getattr(result, name) for name in _RESULT_FIELDS}
    return RecordDict({
        "result": ConfigRecord(fields),
        "train_metrics": MetricRecord(dict(result.train_metrics)),
        "eval_metrics": MetricRecord(dict(result.eval_metrics)),
        "params": _arrays(result.params),
    })


def content_to_result(content: RecordDict) -> StepResult:
    fields = dict(content.config_records["result"])
    return StepResult(
        site=str(fields["site"]), status=str(fields["status"]),
        params=_ndarrays(content.array_records.get("params")),
        train_metrics={k: float(v) for k, v in content.metric_records["train_metrics"].items()},
        eval_metrics={k: float(v) for k, v in content.metric_records["eval_metrics"].items()},
        num_train=int(fields["num_train"]), num_test=int(fields["num_test"]),
        error_type=str(fields["error_type"]), error_line=int(fields["error_line"]),
        error_where=str(fields["error_where"]), fingerprint=str(fields["fingerprint"]),
        version=str(fields["version"]), seconds=float(fields["seconds"]),
    )
