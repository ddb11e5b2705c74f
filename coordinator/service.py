"""The coordinator's run logic: validate a task, submit it to Flower, follow it, record it.

Plain Python over the store and the Flower control wrapper; the HTTP layer (``app.py``)
only authenticates and translates.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from coordinator.aggregate import STRATEGIES
from coordinator.local import package_versions
from coordinator.store import TERMINAL, Store
from site_agent.protocol import source_hash

log = logging.getLogger(__name__)

# The server loop reports how a run ends; following Flower's run status only catches a server
# loop that died without a word, so it need not cost the SuperLink more than a call a second.
FOLLOW_SECONDS = 1.0
# Site events that mean "a message for this site is on the SuperLink": ring its doorbell.
DISPATCHED = ("preparing", "training", "evaluating")
# After a coordinator (re)start, sites need a moment to reopen their presence streams: until
# then a site whose last word was "online" counts as online.
PRESENCE_GRACE_SECONDS = 5.0
MAX_ROUNDS = 10_000
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0


MAX_DP_EPSILON = 100.0


def private_config(epsilon: Any, clip: Any, rounds: int) -> dict[str, Any]:
    """A run's differential-privacy settings as the sites read them from its config (empty without DP)."""
    if epsilon is None:
        if clip is not None:
            raise TaskRejected("--dp-clip needs --dp-epsilon (the run's privacy budget at each site)")
        return {}
    try:
        epsilon, clip = float(epsilon), float(1.0 if clip is None else clip)
    except (TypeError, ValueError):
        raise TaskRejected("--dp-epsilon and --dp-clip must be numbers") from None
    if not 0 < epsilon <= MAX_DP_EPSILON:
        raise TaskRejected(f"--dp-epsilon must be above 0 and at most {MAX_DP_EPSILON:g}, not {epsilon:g}")
    if not 0 < clip < float("inf"):
        raise TaskRejected(f"--dp-clip must be a positive number, not {clip:g}")
    return {"dp_epsilon": epsilon, "dp_clip": clip, "dp_rounds": rounds}


class TaskRejected(Exception):
    """A task that cannot be run; the message says why in a sentence. ``status`` is HTTP."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Principal:
    researcher: str
    project: str


class Control(Protocol):
    fab_hash: str

    def start_run(self, flip_run_id: str) -> int: ...
    def status(self, flower_run_id: int) -> Any: ...
    def stop_run(self, flower_run_id: int) -> bool: ...
    def logs(self, flower_run_id: int, limit: int = 4000) -> str: ...


class Presence:
    """Which site agents hold a live presence stream right now (in memory), and their doorbells.

    A doorbell is a hint, never data: when the server loop has put a message for a site on the
    SuperLink, the coordinator writes "wake" down that site's presence stream and the site pulls
    from the fleet API at once instead of waiting for its next idle poll.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._bells: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}

    def hold(self, site: str) -> asyncio.Event:
        """Count a presence stream; inside the stream's event loop, also give it a doorbell."""
        bell = asyncio.Event()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:  # held from plain code (tests): presence without a doorbell
            loop = None
        with self._lock:
            self._held[site] = self._held.get(site, 0) + 1
            if loop is not None:
                self._bells.setdefault(site, []).append((loop, bell))
        return bell

    def release(self, site: str, bell: asyncio.Event | None = None) -> None:
        with self._lock:
            self._held[site] = max(0, self._held.get(site, 0) - 1)
            self._bells[site] = [(loop, b) for loop, b in self._bells.get(site, []) if b is not bell]

    def online(self, site: str) -> bool:
        with self._lock:
            return self._held.get(site, 0) > 0

    def ring(self, site: str) -> None:
        """Wake ``site``'s fleet client (thread-safe; nothing happens if it holds no stream)."""
        with self._lock:
            bells = list(self._bells.get(site, []))
        for loop, bell in bells:
            loop.call_soon_threadsafe(bell.set)


class RunManager:
    def __init__(self, store: Store, control: Control, notify: Callable[[], None],
                 presence_grace: float = PRESENCE_GRACE_SECONDS) -> None:
        self.store = store
        self.control = control
        self.notify = notify
        self.presence = Presence()
        self.settle_until = time.monotonic() + presence_grace
        self._followers: dict[str, threading.Thread] = {}

    # -- sites ----------------------------------------------------------------------
    def sites(self) -> list[dict[str, Any]]:
        out = []
        for row in self.store.sites():
            settling = time.monotonic() < self.settle_until
            online = row["state"] == "online" and (self.presence.online(row["site"]) or settling)
            info = row["info"]
            out.append({
                "site": row["site"], "status": "online" if online else "offline",
                "node_id": row["node_id"], "version": info.get("version", ""),
                "datasets": info.get("datasets", []), "last_seen": row["last_seen"],
                "warm": bool(info.get("warm", False)) and online,
            })
        return out

    def announce(self, site: str, node_id: int | None, info: dict[str, Any], state: str) -> None:
        self.store.upsert_site(site, node_id, info, state)
        log.info("site %s announced (node %s, %s)", site, node_id, state)

    # -- submission -----------------------------------------------------------------
    def create_run(self, who: Principal, spec: dict[str, Any]) -> dict[str, Any]:
        task = self._validate(who, spec)
        run_id = secrets.token_hex(5)
        task["run_id"] = run_id
        record = {
            "run_id": run_id, "name": task["name"], "project": who.project, "researcher": who.researcher,
            "dataset": task["dataset"], "rounds": task["rounds"], "strategy": task["strategy"],
            "strategy_options": task["strategy_options"], "min_sites": task["min_sites"],
            "round_timeout": task["round_timeout"],
            "seed": task["seed"], "config": task["config"], "source_hash": task["source_hash"],
            "sites": [s["site"] for s in task["sites"]], "initial_model_sha256": task["initial_model"],
            "fab_sha256": self.control.fab_hash, "created": time.time(),
            "hub_packages": package_versions("flip", "flwr", "numpy"),
            "client_packages": spec.get("client_packages", {}),
            "site_datasets": {s["site"]: s["dataset"] for s in task["sites"]},
        }
        self.store.create_run(run_id, task, record)
        self.store.add_events(run_id, [{"type": "run", "status": "submitted", "sites": record["sites"]}])
        try:
            flower_run_id = self.control.start_run(run_id)
        except Exception as exc:  # noqa: BLE001 - any failure to reach Flower ends the run clearly
            self.finish(run_id, "failed", f"the SuperLink refused the run: {type(exc).__name__}: {exc}")
            raise TaskRejected(f"the SuperLink refused the run ({type(exc).__name__}: {exc})", 503) from exc
        self.store.set_flower_run(run_id, flower_run_id)
        self.store.update_record(run_id, flower_run_id=flower_run_id)
        self.follow(run_id)
        self.notify()
        return self.view(run_id)

    def check(self, who: Principal, spec: dict[str, Any]) -> dict[str, Any]:
        """Everything ``create_run`` would refuse, before the notebook builds and uploads the model."""
        task = self._validate(who, spec, model_uploaded=False)
        return {"ok": True, "sites": [s["site"] for s in task["sites"]], "min_sites": task["min_sites"]}

    def _validate(self, who: Principal, spec: dict[str, Any], model_uploaded: bool = True) -> dict[str, Any]:
        source = spec.get("source")
        if not isinstance(source, str) or not source.strip():
            raise TaskRejected("the task has no source: the cell must define build_model, train and evaluate")
        dataset = str(spec.get("dataset") or "")
        holders = [s for s in self.sites() if any(d["name"] == dataset for d in s["datasets"])]
        if not holders:
            known = sorted({d["name"] for s in self.sites() for d in s["datasets"]})
            listing = ", ".join(known) if known else "none (no site has registered a dataset)"
            raise TaskRejected(f"unknown dataset {dataset!r}: the datasets that exist are {listing}", 404)
        online = [s for s in holders if s["status"] == "online" and s["node_id"] is not None]
        offline = sorted(s["site"] for s in holders if s not in online)
        min_sites = spec.get("min_sites")
        min_sites = len(online) if min_sites is None else int(min_sites)
        if min_sites < 1:
            raise TaskRejected("--min-sites must be at least 1")
        if len(online) < max(min_sites, 1):
            gone = f" ({', '.join(offline)} offline)" if offline else ""
            raise TaskRejected(
                f"--min-sites is {min_sites} but only {len(online)} online site(s) hold {dataset!r}{gone}", 409
            )
        rounds = int(spec.get("rounds", 1))
        if not 1 <= rounds <= MAX_ROUNDS:
            raise TaskRejected(f"--rounds must be between 1 and {MAX_ROUNDS}, not {rounds}")
        strategy = str(spec.get("strategy", "fedavg")).lower()
        if strategy not in STRATEGIES:
            raise TaskRejected(f"unknown strategy {strategy!r}: use one of {', '.join(sorted(STRATEGIES))}")
        initial = str(spec.get("initial_model") or "")
        try:
            if model_uploaded and not self.store.model_path(initial).exists():
                raise KeyError(initial)
        except KeyError:
            raise TaskRejected("the initial model was not uploaded (POST /api/models first)") from None
        round_timeout = spec.get("round_timeout")
        if round_timeout is not None:
            round_timeout = float(round_timeout)
            if not 0 < round_timeout <= MAX_ROUND_TIMEOUT:
                raise TaskRejected(f"--round-timeout must be between 0 and {MAX_ROUND_TIMEOUT:.0f} seconds, "
                                   f"not {round_timeout:g}")
        config = spec.get("config") or {}
        if not isinstance(config, dict) or not all(
            isinstance(v, (str, int, float, bool)) for v in config.values()
        ):
            raise TaskRejected("--config values must be numbers, booleans or strings")
        if reserved := sorted(k for k in config if str(k).startswith("dp_")):
            raise TaskRejected(f"--config {reserved[0]} is reserved: use --dp-epsilon and --dp-clip")
        config = {**config, **private_config(spec.get("dp_epsilon"), spec.get("dp_clip"), rounds)}
        strategy_options = {k: float(config[k]) for k in ("server_lr", "beta1", "beta2", "tau", "proximal_mu")
                            if k in config}
        return {
            "name": str(spec.get("name") or "run"), "project": who.project, "researcher": who.researcher,
            "source": source, "source_hash": source_hash(source), "dataset": dataset, "rounds": rounds,
            "strategy": strategy, "strategy_options": strategy_options, "min_sites": min_sites,
            "seed": int(spec.get("seed", 0)), "config": config, "initial_model": initial,
            "round_timeout": round_timeout,
            "sites": [
                {"site": s["site"], "node_id": s["node_id"],
                 "dataset": next(d for d in s["datasets"] if d["name"] == dataset)}
                for s in sorted(online, key=lambda s: s["site"])
            ],
        }

    # -- events and state -----------------------------------------------------------
    def ingest(self, run_id: str, events: list[dict[str, Any]]) -> None:
        run = self.store.run(run_id)
        if run is None:
            raise TaskRejected(f"no run {run_id!r}", 404)
        if run["status"] in TERMINAL:
            events = [e for e in events if e.get("type") != "run"]
        self.store.add_events(run_id, events)
        for event in events:
            if event.get("type") == "site" and event.get("status") in DISPATCHED:
                self.presence.ring(str(event["site"]))  # its message is on the SuperLink now
            if event.get("type") != "run":
                continue
            status = event.get("status")
            if status == "running":
                self.store.set_status(run_id, "running")
            elif status == "completed":
                self.store.update_record(
                    run_id, model_sha256=event.get("model_sha256"), site_info=event.get("site_info", {}),
                    failed_sites=event.get("failed_sites", {}),
                )
                self.store.set_status(run_id, "completed")
            elif status in ("failed", "stopped"):
                self.store.set_status(run_id, str(status), str(event.get("reason", "")))
        self.notify()

    def finish(self, run_id: str, status: str, reason: str) -> None:
        """End a run from the coordinator's side (stop, Flower failure), with its event."""
        if self.store.set_status(run_id, status, reason):
            self.store.add_events(run_id, [{"type": "run", "status": status, "reason": reason}])
            self.notify()

    def stop(self, run_id: str) -> dict[str, Any]:
        run = self.store.run(run_id)
        if run is None:
            raise TaskRejected(f"no run {run_id!r}", 404)
        if run["status"] not in TERMINAL and run["flower_run_id"] is not None:
            self.control.stop_run(int(run["flower_run_id"]))
        self.finish(run_id, "stopped", "stopped by the researcher")
        return self.view(run_id)

    def view(self, run_id: str) -> dict[str, Any]:
        run = self.store.run(run_id)
        if run is None:
            raise TaskRejected(f"no run {run_id!r}", 404)
        record = {**run["record"], "status": run["status"], "reason": run["reason"], "finished": run["finished"]}
        return {
            "run_id": run_id, "name": run["name"], "status": run["status"], "reason": run["reason"],
            "dataset": run["dataset"], "project": run["project"], "researcher": run["researcher"],
            "rounds": run["task"]["rounds"], "strategy": run["task"]["strategy"],
            "sites": record.get("sites", []), "created": run["created"], "finished": run["finished"],
            "source": run["task"]["source"], "record": record,
        }

    # -- following Flower -----------------------------------------------------------
    def follow(self, run_id: str) -> None:
        thread = threading.Thread(target=self._follow, args=(run_id,), name=f"follow-{run_id}", daemon=True)
        self._followers[run_id] = thread
        thread.start()

    def resume(self) -> None:
        """After a coordinator restart: follow every run that had not finished."""
        for run in self.store.unfinished_runs():
            if run["flower_run_id"] is None:
                self.finish(run["run_id"], "failed", "the coordinator stopped before the run was submitted")
            else:
                self.follow(run["run_id"])

    def _follow(self, run_id: str) -> None:
        run = self.store.run(run_id)
        assert run is not None and run["flower_run_id"] is not None
        flower_run_id = int(run["flower_run_id"])
        while True:
            try:
                status = self.control.status(flower_run_id)
            except Exception as exc:  # noqa: BLE001 - the SuperLink may be restarting
                log.warning("cannot read the status of Flower run %s: %s", flower_run_id, exc)
                status = None
            if status is not None and status.status == "finished":
                break
            time.sleep(FOLLOW_SECONDS)
        current = self.store.run(run_id)
        if current is not None and current["status"] not in TERMINAL:
            kind = "stopped" if status.sub_status == "stopped" else "failed"
            self.finish(run_id, kind, f"the Flower run ended ({status.sub_status}) before FLIP's server loop "
                                      f"reported a result.{self._last_log_line(flower_run_id)}")

    def _last_log_line(self, flower_run_id: int) -> str:
        try:
            lines = self.control.logs(flower_run_id, limit=600).strip().splitlines()
        except Exception:  # noqa: BLE001 - the log is a courtesy
            return ""
        return f" Last server log line: {lines[-1]}" if lines else ""
