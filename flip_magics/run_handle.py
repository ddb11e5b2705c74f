"""A run as the notebook sees it (:class:`RunHandle`): followed live from its event stream in a background thread
that reconnects by itself, it keeps per-site status, the metric history, the record and the final model.

No IPython here: the magics draw it (``flip_magics.widgets``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from flip_core.errors import RunFailed
from flip_core.runs import RunRecord, record_of
from flip_core.status import TERMINAL, EventType, RunStatus, SiteState
from flip_magics.connection import Connection
from flip_magics.task import PreparedTask, load_weights, prepare

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ["round", "site", "phase", "metric", "value"]
STEP_DEVICE = ("device", "gpu_peak_bytes", "gpu_seconds")  # where a site's step ran (GPU memory and time on one)
STEP_DONE = (SiteState.READY, SiteState.DONE)
STEP_COLUMNS = ["round", "site", "status", "samples", "seconds", *STEP_DEVICE, "received_bytes", "sent_bytes"]
RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0)


class RunHandle:
    """A run as the notebook sees it; updated live from the event stream, read through ``connection``."""

    def __init__(self, connection: Connection, view: dict[str, Any], task: PreparedTask | None) -> None:
        self.connection = connection
        self.run_id: str = view["run_id"]
        self.name: str = view["name"]
        self.rounds: int = int(view["rounds"])
        self.dataset: str = view["dataset"]
        self._view = view
        self._task = task
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._subscribers: list[Callable[[RunHandle], None]] = []
        self._ended: list[Callable[[RunHandle], None]] = []
        self._status: str = view["status"]
        self.reason: str = view.get("reason", "")
        self.round: int = 0
        self.sites: dict[str, dict[str, Any]] = {
            s: {"site": s, "status": SiteState.WAITING, "samples": None, "round": None, "detail": ""}
            for s in view.get("sites", [])
        }
        self.events: list[dict[str, Any]] = []
        self._rows: list[dict[str, Any]] = []
        self._model: Any = None
        self.connection_note = ""
        self._thread = threading.Thread(target=self._follow, name=f"flip-run-{self.run_id}", daemon=True)
        self._thread.start()

    # -- public ---------------------------------------------------------------------
    @property
    def status(self) -> str:
        return self._status

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def history(self) -> pd.DataFrame:
        with self._lock:
            rows = list(self._rows)
        frame = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
        return frame.sort_values(["round", "site", "phase", "metric"], kind="stable").reset_index(drop=True)

    @property
    def steps(self) -> pd.DataFrame:
        """Every site's every step as it finished: round (0: the initial model's evaluation), samples, seconds,
        where it ran (device; on a GPU its peak memory in bytes and GPU seconds) and the bytes it moved."""
        with self._lock:
            done = [e for e in self.events if e.get("type") == EventType.SITE and e.get("status") in STEP_DONE]
        frame = pd.DataFrame([{c: e.get(c) for c in STEP_COLUMNS} for e in done], columns=STEP_COLUMNS)
        return frame.sort_values(["round", "site"], kind="stable").reset_index(drop=True)

    @property
    def record(self) -> RunRecord:
        """The run's record as the hub keeps it (``record.model_sha256``; ``record["model_sha256"]`` reads it too)."""
        return record_of(self.connection.run(self.run_id))

    @property
    def model(self) -> Any:
        """The global model with its final weights (waits for the run to end)."""
        self.wait()
        if self._model is None:
            task = self._task or prepare(self.connection.run(self.run_id)["source"])
            self._task = task
            self._model = load_weights(task, self.connection.model_params(self.run_id))
        return self._model

    def save(self, directory: str | Path, example: Any = None) -> Path:
        """Export the final model to ``directory`` (:func:`flip_magics.export.export_model`: safetensors weights,
        the cell as its architecture, a model card) and check that the folder alone gives the run's output on a
        probe input; ``example``: an input tensor, where the probe cannot be inferred from the first layer."""
        from flip_magics.export import export_model, verify_export

        folder = export_model(directory, model=self.model, source=self.source, record=self.record, example=example)
        verify_export(folder)
        return folder

    @property
    def task(self) -> PreparedTask | None:
        """The cell as this kernel prepared it, with the run's initial model (None: a run attached to, not
        submitted from here)."""
        return self._task

    @property
    def source(self) -> str:
        return self._task.source if self._task else str(self.connection.run(self.run_id)["source"])

    def when_ended(self, callback: Callable[[RunHandle], None]) -> None:
        """Call ``callback(handle)`` once the run has ended: from the follower thread, and again from the thread
        that calls :meth:`wait` (a notebook's static output must come from the executing cell's thread)."""
        self._ended.append(callback)
        if self.done:
            callback(self)

    def wait(self, timeout: float | None = None) -> RunHandle:
        """Block until the run ends; raise :class:`RunFailed` if it did not complete."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"run {self.run_id} still {self._status} after {timeout} s")
        self._call_ended()
        if self._status != RunStatus.COMPLETED:
            raise RunFailed(self.run_id, self._status, self.reason)
        return self

    def subscribe(self, callback: Callable[[RunHandle], None]) -> None:
        """Call ``callback(handle)`` after every change (from the follower thread)."""
        self._subscribers.append(callback)
        callback(self)

    def chart_points(self) -> list[tuple[str, str, float, float]]:
        """(metric, series, round, value): every site's metrics and the global ones, one panel per metric."""
        with self._lock:
            return [
                (f"{r['phase']} {r['metric']}", r["site"], float(r["round"]), float(r["value"])) for r in self._rows
            ]

    def site_rows(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(v) for _, v in sorted(self.sites.items())]

    def __repr__(self) -> str:
        return f"<FLIP run {self.run_id} {self.name!r}: {self._status}, round {self.round}/{self.rounds}>"

    # -- following ------------------------------------------------------------------
    def _follow(self) -> None:
        after, attempt = 0, 0
        while not self._done.is_set():
            try:
                for event in self.connection.events(self.run_id, after):
                    attempt = 0
                    if self.connection_note:
                        self.connection_note = ""
                    after = max(after, int(event.get("seq", after)))
                    self._apply(event)
                    if self._done.is_set():
                        return
            except Exception as exc:  # noqa: BLE001 - keep following through coordinator restarts
                self.connection_note = f"reconnecting to the coordinator ({type(exc).__name__})"
                self._publish()
            if not self._done.is_set():
                time.sleep(RECONNECT_SECONDS[min(attempt, len(RECONNECT_SECONDS) - 1)])
                attempt += 1

    def _apply(self, event: dict[str, Any]) -> None:
        event = {**event, "received": time.time()}
        kind = event.get("type")
        with self._lock:
            self.events.append(event)
            if kind == EventType.METRICS:
                for metric, value in event["metrics"].items():
                    self._rows.append(
                        {
                            "round": int(event["round"]),
                            "site": event["site"],
                            "phase": event["phase"],
                            "metric": metric,
                            "value": float(value),
                        }
                    )
            elif kind == EventType.SITE:
                row = self.sites.setdefault(event["site"], {"site": event["site"], "samples": None, "detail": ""})
                row.update(status=event["status"], round=event.get("round"))
                if "samples" in event:
                    row["samples"] = event["samples"]
                for field in ("received_bytes", "sent_bytes", *STEP_DEVICE):  # this round's payloads, its device
                    if field in event:
                        row[field] = event[field]
                row["detail"] = event.get("detail", "")
            elif kind == EventType.ROUND:
                self.round = int(event["round"])
            elif kind == EventType.RUN:
                self._status = str(event["status"])
                self.reason = str(event.get("reason", ""))
        self._publish()  # views first, so that a finished wait() finds them final
        if kind == EventType.RUN and self._status in TERMINAL:
            self._done.set()
            self._call_ended()

    def _call_ended(self) -> None:
        for callback in list(self._ended):
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a broken view must not stop the follower or a wait
                log.exception("a run's end callback failed")

    def _publish(self) -> None:
        for callback in list(self._subscribers):
            try:
                callback(self)
            except Exception:  # noqa: BLE001 - a broken view must not stop the follower
                log.exception("a run subscriber failed")


__all__ = ["HISTORY_COLUMNS", "STEP_COLUMNS", "TERMINAL", "RunHandle"]
