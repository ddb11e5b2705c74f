"""Fakes of Flower's side of the hub: its control API (runs started, stopped, their status) and the Grid the
server loop pushes messages to and pulls replies from."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Message, Metadata
from flwr.app.message import make_message

from flip_core.codec import frame_header
from flip_core.protocol import StepResult, decode_request
from flip_core.status import Phase
from flip_core.wire import content_to_blob, result_to_content

if TYPE_CHECKING:
    from fakes.hub import FakeHub

GRID_NODES = {"A": 1, "B": 2, "C": 3, "D": 4}  # the fake grid's sites and their Flower node ids


@dataclass
class FakeFlowerStatus:
    status: str
    sub_status: str = ""
    details: str = ""


@dataclass
class FakeControl:
    """Stands in for coordinator.flower_control.FlowerControl: records calls, starts nothing."""

    fab_hash: str = "fakefab"
    started: list[str] = field(default_factory=list)
    stopped: list[int] = field(default_factory=list)
    statuses: dict[int, FakeFlowerStatus] = field(default_factory=dict)
    refuse: bool = False

    def start_run(self, flip_run_id: str) -> int:
        if self.refuse:
            raise ConnectionError("SuperLink unreachable")
        self.started.append(flip_run_id)
        run = 1000 + len(self.started)
        self.statuses[run] = FakeFlowerStatus("running")
        return run

    def status(self, flower_run_id: int) -> Any:
        return self.statuses.get(flower_run_id)

    def stop_run(self, flower_run_id: int) -> bool:
        self.stopped.append(flower_run_id)
        self.statuses[flower_run_id] = FakeFlowerStatus("finished", "stopped")
        return True

    def logs(self, flower_run_id: int, limit: int = 4000) -> str:
        return "ServerApp crashed: boom\n"


class FakeGrid:
    """Stands in for Flower's Grid: answers every message at once, except fit steps for the sites in
    ``silent`` (stragglers). Its sites are ``GRID_NODES``."""

    def __init__(
        self,
        silent: set[str],
        pending: dict[str, int] | None = None,
        refusing: dict[str, str] | None = None,
        hub: FakeHub | None = None,
    ) -> None:
        self.silent = silent
        self.hub = hub  # where large payloads go (its fake store), for steps and replies above the inline limit
        self.pending = dict(pending or {})  # site: how many prepare asks it answers "pending" (awaiting approval)
        self.refusing = dict(refusing or {})  # site: its policy's refusal
        self.outbox: dict[str, Message] = {}
        self.count = 0

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for msg in messages:
            site = next(s for s, node in GRID_NODES.items() if node == msg.metadata.dst_node_id)
            self.count += 1
            mid = f"m{self.count}"
            ids.append(mid)
            step = content_to_blob(msg.content, None if self.hub is None else self.hub.fetch)
            phase = frame_header(step)["phase"]
            width = int(decode_request(step).params["w"].size)
            if phase != Phase.PREPARE and site in self.silent:
                continue
            if phase == Phase.PREPARE and self.pending.get(site, 0) > 0:
                self.pending[site] -= 1
                self._answer(
                    site,
                    mid,
                    msg,
                    StepResult(site=site, status="pending", error_where=f"waiting for approval at {site}"),
                )
                continue
            if site in self.refusing:
                self._answer(site, mid, msg, StepResult(site=site, status="refused", error_where=self.refusing[site]))
                continue
            result = StepResult(
                site=site,
                status="ok",
                params={"w": np.ones(width)} if phase == "fit" else {},
                train_metrics={"loss": 0.5} if phase == "fit" else {},
                eval_metrics={"accuracy": 0.75},
                num_train=10,
                num_test=5,
            )
            self._answer(site, mid, msg, result)
        return ids

    def _answer(self, site: str, mid: str, msg: Message, result: StepResult) -> None:
        meta = Metadata(
            run_id=1,
            message_id="",
            src_node_id=GRID_NODES[site],
            dst_node_id=0,
            reply_to_message_id=mid,
            group_id="",
            created_at=time.time(),
            ttl=60,
            message_type=msg.metadata.message_type,
        )
        publish = None if self.hub is None else (lambda blob, sha: self.hub.uploaded.__setitem__((site, sha), blob))  # type: ignore[union-attr]
        self.outbox[mid] = make_message(meta, result_to_content(result, publish))

    def pull_messages(self, ids: list[str]) -> list[Message]:
        return [self.outbox.pop(mid) for mid in ids if mid in self.outbox]
