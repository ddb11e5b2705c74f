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
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
    StreamLogsRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab

from coordinator.fab import FAB_DIR

log = logging.getLogger(__name__)

RUN_ID_KEY = "flip-run-id"
QUERY_LINE_RUN_ID = "query-line"  # the flip-run-id of the query line's run (coordinator.query_line)


@dataclass(frozen=True)
class FlowerRunStatus:
    status: str  # "pending", "starting", "running", "finished"
    sub_status: str  # for finished runs: "completed", "failed" or "stopped"
    details: str


def build_fab(path: Path = FAB_DIR) -> Fab:
    blob = build_fab_from_disk(Path(path))
    return Fab(hashlib.sha256(blob).hexdigest(), blob, {})


class FlowerControl:
    """A thin, typed wrapper over Flower's control API (TLS when given the consortium's CA certificate)."""

    def __init__(self, address: str, root_certificates: Path | None = None) -> None:
        self.address = address
        certificates = None if root_certificates is None else str(root_certificates)
        self._client = ControlHttpClient.from_server_address(
            address, certificates is None, certificates, interceptors=[]
        )
        self._fab: Fab | None = None

    @property
    def fab(self) -> Fab:
        if self._fab is None:
            self._fab = build_fab()
        return self._fab

    @property
    def fab_hash(self) -> str:
        return str(self.fab.hash_str)

    def start_run(self, flip_run_id: str) -> int:
        overrides = user_config_to_proto(parse_config_args([f'{RUN_ID_KEY}="{flip_run_id}"']))
        response = self._client.StartRun(StartRunRequest(fab=fab_to_proto(self.fab), override_config=overrides))
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

    def register_node(self, public_key: bytes, name: str) -> int:
        """Let the SuperNode holding ``public_key`` (PEM, as ``flip_core.certs.public_key_bytes`` reads it)
        join: what ``flwr supernode register`` does. Returns the node id the SuperLink gives it."""
        response = self._client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name))
        if not response.node_id:
            raise RuntimeError(f"the SuperLink did not register the key ({response})")
        return int(response.node_id)

    def unregister_node(self, node_id: int) -> None:
        self._client.UnregisterNode(UnregisterNodeRequest(node_id=node_id))

    def close(self) -> None:
        """Close the connection (the SuperLink waits for open ones when it shuts down)."""
        self._client.close()

    def ready(self) -> bool:
        """Whether the SuperLink's control API answers."""
        try:
            self._client.ListRuns(ListRunsRequest())
        except Exception:  # noqa: BLE001 - not up yet (connection refused, TLS not ready, ...)
            return False
        return True

    def logs(self, flower_run_id: int, limit: int = 4000) -> str:
        """The ServerApp's log of a finished run (its last ``limit`` characters)."""
        chunks: list[str] = []
        for response in self._client.StreamLogs(StreamLogsRequest(run_id=flower_run_id, after_timestamp=0)):
            chunks.append(response.log_output)
        return "".join(chunks)[-limit:]
