"""Submitting and following runs through the SuperLink's control API.

This is the one module that leans on Flower internals (the control HTTP client, the FAB
builder, protobuf serde), the same calls ``flwr run`` makes in ``flwr/cli/run/run.py``.
``tests/coordinator/test_flower_contract.py`` fails loudly if any of them moves.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from flwr.cli.build import build_fab_from_disk
from flwr.common.config import parse_config_args
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListRunsRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab

from coordinator.fab import FAB_DIR

log = logging.getLogger(__name__)

RUN_ID_KEY = "flip-run-id"


@dataclass(frozen=True)
class FlowerRunStatus:
    status: str  # "pending", "starting", "running", "finished"
    sub_status: str  # for finished runs: "completed", "failed" or "stopped"
    details: str


def build_fab(path: Path = FAB_DIR) -> Fab:
    blob = build_fab_from_disk(Path(path))
    return Fab(hashlib.sha256(blob).hexdigest(), blob, {})


class FlowerControl:
    """A thin, typed wrapper over Flower's control API."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._client = ControlHttpClient.from_server_address(address, True, None, interceptors=[])
        self._fab = build_fab()

    @property
    def fab_hash(self) -> str:
        return str(self._fab.hash_str)

    def start_run(self, flip_run_id: str) -> int:
        overrides = user_config_to_proto(parse_config_args([f'{RUN_ID_KEY}="{flip_run_id}"']))
        response = self._client.StartRun(StartRunRequest(fab=fab_to_proto(self._fab), override_config=overrides))
        if not response.HasField("run_id"):
            raise RuntimeError(f"the SuperLink did not start the run ({response})")
        return int(response.run_id)

    def status(self, flower_run_id: int) -> FlowerRunStatus | None:
        response = self._client.ListRuns(ListRunsRequest(run_id=flower_run_id))
        run = response.run_dict.get(flower_run_id)
        if run is None:
            return None
        return FlowerRunStatus(run.status.status, run.status.sub_status, run.status.details)

    def stop_run(self, flower_run_id: int) -> bool:
        return bool(self._client.StopRun(StopRunRequest(run_id=flower_run_id)).success)

    def logs(self, flower_run_id: int, limit: int = 4000) -> str:
        """The ServerApp's log of a finished run (its last ``limit`` characters)."""
        chunks: list[str] = []
        for response in self._client.StreamLogs(StreamLogsRequest(run_id=flower_run_id, after_timestamp=0)):
            chunks.append(response.log_output)
        return "".join(chunks)[-limit:]
