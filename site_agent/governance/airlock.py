"""The site's airlock: items a researcher asked to be released, held for a person at the site to review.

An item is held exactly as it would leave (``airlock/requests/ID.item``), beside its request (``ID.json``: who
asked, for which project, why, what it is, the automatic checks run on it when it was held, its state). Nothing of
it leaves until the site's admin releases it (``flip-site airlock release ID``); a release is signed with the
site's key (``flip_core.airlock.sign``) and every step (held, released or refused, delivered) is written to the
audit log. The agent holds and reports; the CLI decides; both may act at once, so a decision holds a lock on its
request while it reads and writes it.

The agent also keeps what a run's task process wrote for the airlock (``airlock/kept/``): each run's last failed
step's traceback, and the report of its final evaluation where the cell defines ``report()``, for a request that may
never come: neither leaves otherwise.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from flip_core.airlock import (
    MEDIA_TYPES,
    ItemKind,
    Release,
    ReleaseAsk,
    ReleaseState,
    cut_text,
    public_key_text,
    sha256,
    sign,
)
from flip_core.errors import ConfigError
from site_agent.disclosure.report_review import figure_bytes, without_figures
from site_agent.governance.audit import AuditLog

AIRLOCK_FOLDER = "airlock"
REQUEST_ID = re.compile(r"^[a-z0-9][a-z0-9-]{5,39}\Z")
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")


class AirlockError(ConfigError):
    """A request the airlock cannot find or act on, stated as a sentence."""


@dataclass
class Held:
    """One request as the site holds it."""

    request_id: str
    item: ItemKind
    purpose: str
    researcher: str
    project: str
    about: dict[str, Any]  # what the item is of: the run and its step, or the query as written
    media_type: str
    sha256: str
    size: int
    checks: list[dict[str, Any]]  # site_agent.disclosure.checks.as_records, run when the item was held
    asked_at: float
    state: ReleaseState = ReleaseState.PENDING
    reason: str = ""
    decided_at: float = 0.0
    checker: str = ""
    release: dict[str, Any] = field(default_factory=dict)  # the signed Release, once released

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Held:
        return cls(**{**raw, "item": ItemKind(raw["item"]), "state": ReleaseState(raw["state"])})

    def failed_checks(self) -> list[str]:
        return [str(c["name"]) for c in self.checks if not c["passed"]]

    def readable(self, content: bytes, out: Path | None = None) -> str:
        """The item as the admin reads it: text as it is; an evaluation report with its figures as their sizes
        (written to ``out`` as PNG files to look at)."""
        if self.item != ItemKind.EVALUATION or not content:
            return content.decode("utf-8", "replace")
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            for name, png in figure_bytes(content).items():
                safe = "".join(c if c.isalnum() else "_" for c in name)[:60]
                (out / f"{self.request_id}-{safe}.png").write_bytes(png)
        said = json.dumps(without_figures(content), indent=1, sort_keys=True)
        return said + ("" if out is None else f"\n(its figures are in {out})")


class Airlock:
    """The airlock of the site in ``root`` (named ``site``), writing to its audit log."""

    def __init__(self, root: Path, site: str, audit: AuditLog) -> None:
        self.root = Path(root)
        self.site = site
        self.audit = audit
        self.requests = self.root / AIRLOCK_FOLDER / "requests"
        self.kept = self.root / AIRLOCK_FOLDER / "kept"

    # -- what a run's steps left for a request that may come ---------------------------------------------------
    def keep(self, item: ItemKind, run_id: str, facts: dict[str, Any], text: str) -> None:
        """Keep ``text`` (what the task process wrote for run ``run_id``: a failed step's traceback, or the final
        evaluation's report) with ``facts`` (round, phase, researcher, project, dataset): a later one replaces it."""
        if not RUN_ID.match(run_id) or not text:
            return
        data = cut_text(text).encode("utf-8", "replace")
        _write(self.kept / f"{item}-{run_id}.json", {**facts, "run": run_id, "at": time.time()})
        _write_bytes(self.kept / f"{item}-{run_id}.txt", data)

    def kept_for(self, item: ItemKind, run_id: str) -> tuple[dict[str, Any], bytes] | None:
        """What run ``run_id`` left here of kind ``item`` (its facts and its bytes), or None."""
        if not RUN_ID.match(run_id):
            return None
        try:
            facts = json.loads((self.kept / f"{item}-{run_id}.json").read_text())
            return facts, (self.kept / f"{item}-{run_id}.txt").read_bytes()
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # -- requests -----------------------------------------------------------------------------------------------
    def hold(
        self,
        ask: ReleaseAsk,
        researcher: str,
        project: str,
        content: bytes,
        *,
        about: dict[str, Any],
        checks: list[dict[str, Any]],
        refused: str = "",
    ) -> Held:
        """Hold ``content`` for review under ``ask``'s id (``refused``: the policy's sentence, and it is refused at
        once instead). A request id the site holds already is not held again (the caller reports the old one)."""
        if not REQUEST_ID.match(ask.request_id):
            raise AirlockError(f"{ask.request_id[:60]!r} is not a request id")
        held = Held(
            request_id=ask.request_id,
            item=ask.item,
            purpose=ask.purpose,
            researcher=researcher,
            project=project,
            about=about,
            media_type=MEDIA_TYPES[ask.item],
            sha256=sha256(content),
            size=len(content),
            checks=checks,
            asked_at=time.time(),
        )
        if refused:
            held.state, held.reason, held.decided_at, held.checker = (
                ReleaseState.REFUSED,
                refused,
                time.time(),
                "policy",
            )
        self.requests.mkdir(parents=True, exist_ok=True)
        path = self._path(ask.request_id)
        with _locked(path):
            if path.exists():
                raise AirlockError(f"request {ask.request_id} is held here already")
            if not refused:
                _write_bytes(path.with_suffix(".item"), content)
            _write(path, asdict(held))
        self.audit.append(
            "airlock-request",
            request=held.request_id,
            item=str(held.item),
            researcher=researcher,
            project=project,
            purpose=held.purpose,
            about=about,
            sha256=held.sha256,
            size=held.size,
            checks_failed=held.failed_checks(),
            state=str(held.state),
            reason=held.reason,
        )
        return held

    def keep_rows(self, request_id: str, rows: list[int]) -> None:
        """The table rows a query item counts (positions), for the query ledger once the item is delivered."""
        _write_bytes(self._path(request_id).with_suffix(".rows"), json.dumps(rows).encode())

    def rows(self, request_id: str) -> list[int] | None:
        try:
            rows: list[int] = json.loads(self._path(request_id).with_suffix(".rows").read_text())
        except FileNotFoundError:
            return None
        return rows

    def get(self, request_id: str) -> Held:
        path = self._path(request_id)
        try:
            return Held.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise AirlockError(
                f"{self.site} holds no request {request_id!r} (flip-site airlock list shows them)"
            ) from None

    def content(self, request_id: str) -> bytes:
        """The held item's exact bytes (what would leave)."""
        try:
            return self._path(request_id).with_suffix(".item").read_bytes()
        except FileNotFoundError:
            raise AirlockError(f"request {request_id} holds no item here (refused by the site's policy)") from None

    def held(self, state: ReleaseState | None = None) -> list[Held]:
        """Every request held here (``state``: only those), oldest first."""
        if not self.requests.is_dir():
            return []
        found = [Held.from_dict(json.loads(p.read_text())) for p in self.requests.glob("*.json")]
        return sorted((h for h in found if state is None or h.state == state), key=lambda h: h.asked_at)

    def decide(
        self, request_id: str, *, release: bool, checker: str, reason: str = "", key: ec.EllipticCurvePrivateKey | None
    ) -> Held:
        """Release (signed with ``key``) or refuse (with ``reason``) a pending request, on the audit record."""
        path = self._path(request_id)
        if not path.exists():
            self.get(request_id)  # says so in a sentence
        with _locked(path):
            held = self.get(request_id)
            if held.state != ReleaseState.PENDING:
                raise AirlockError(f"request {request_id} was {held.state} already ({held.checker}, {_when(held)})")
            if release and key is None:
                raise AirlockError(
                    f"{self.site} has no key pair to sign a release with (flip-site keygen makes one; the hub operator "
                    "registers its public key)"
                )
            if not release and not reason.strip():
                raise AirlockError("say why it is refused (--reason): the researcher is told")
            held.decided_at, held.checker, held.reason = time.time(), checker, reason.strip()
            if release:
                assert key is not None
                content = self.content(request_id)
                if sha256(content) != held.sha256:
                    raise AirlockError(f"request {request_id}'s item changed since it was held: not released")
                signed = sign(
                    Release(
                        request_id=held.request_id,
                        site=self.site,
                        item=held.item,
                        media_type=held.media_type,
                        sha256=held.sha256,
                        size=held.size,
                        researcher=held.researcher,
                        project=held.project,
                        purpose=held.purpose,
                        released_at=held.decided_at,
                        checker=checker,
                        public_key=public_key_text(key.public_key()),
                    ),
                    key,
                )
                held.state, held.release = ReleaseState.RELEASED, signed.to_dict()
            else:
                held.state = ReleaseState.REFUSED
                self._path(request_id).with_suffix(".item").unlink(missing_ok=True)  # a refused item is not kept
            self.audit.append(
                "airlock-decision",
                request=request_id,
                decision=str(held.state),
                checker=checker,
                reason=held.reason,
                sha256=held.sha256,
                signature=held.release.get("signature", ""),
            )
            _write(path, asdict(held))
        return held

    def states(self, ids: Sequence[str], researcher: str, project: str, *, content: bool) -> dict[str, dict[str, Any]]:
        """What the researcher may know of their requests ``ids`` here: each one's state, a refusal's reason and,
        with ``content``, a released item (audited as delivered). Another's request is "unknown"."""
        out: dict[str, dict[str, Any]] = {}
        for request_id in ids:
            try:
                held = self.get(request_id) if REQUEST_ID.match(request_id) else None
            except AirlockError:
                held = None
            if held is None or held.researcher != researcher or held.project != project:
                out[request_id] = {"state": "unknown"}
                continue
            state: dict[str, Any] = {"state": str(held.state), "reason": held.reason, "decided_at": held.decided_at}
            if held.state == ReleaseState.RELEASED and content:
                data = self.content(request_id)
                state.update(release=held.release, content=data)
                self.audit.append("airlock-delivered", request=request_id, researcher=researcher, sha256=held.sha256)
            out[request_id] = state
        return out

    def _path(self, request_id: str) -> Path:
        if not REQUEST_ID.match(request_id):
            raise AirlockError(f"{request_id[:60]!r} is not a request id")
        return self.requests / f"{request_id}.json"


def _when(held: Held) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(held.decided_at))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path``'s request (a lock file beside it), across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _write(path: Path, data: dict[str, Any]) -> None:
    _write_bytes(path, json.dumps(data, indent=1, default=str).encode())


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        os.fchmod(f.fileno(), 0o600)
    os.replace(tmp, path)
