"""A site's append-only audit log: every policy decision and task outcome, hash-chained.

The log lives in ``<site_dir>/audit/audit.jsonl``, one JSON record per line. Each record
carries a sequence number and the hash of the record before it (``prev``), and its own hash
over its content (``hash``), so that a record edited, deleted, reordered or inserted after the
fact shows up as a broken chain when the log is verified (``verify``, ``flip-site audit``).
The site agent and the ``flip-site`` CLI both append, possibly at the same moment, so every
append holds an exclusive lock on the file while it reads the tail and writes its line.

The chain proves the log consistent with itself, not complete: whoever can write the file can
drop its newest records without trace (see ``verify``). Nothing here talks to the network.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, BinaryIO

from flip_core.errors import ConfigError

AUDIT_FILE = "audit/audit.jsonl"
GENESIS = "sha256:" + "0" * 64
RESERVED = ("seq", "time", "kind", "prev", "hash")
SHOW_WIDTH = 60  # longest value `show` prints whole
_TAIL_BLOCK = 8192


class AuditError(ConfigError):
    """An audit log that cannot be read, stated as a sentence."""


def audit_path(site_dir: Path) -> Path:
    """The audit log of the site in ``site_dir`` (it need not exist yet)."""
    return Path(site_dir) / AUDIT_FILE


def record_hash(record: dict[str, Any]) -> str:
    """The hash of a record's content: everything in it except its own ``hash`` key.

    The content is serialised canonically (sorted keys, no whitespace, UTF-8), so the hash
    does not depend on the key order or spacing of the line the record was read from.
    """
    content = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class AuditLog:
    """Appends records to one site's audit log; safe to use from several processes at once."""

    def __init__(self, site_dir: Path) -> None:
        self.path = audit_path(site_dir)

    def append(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Append one record of ``kind`` with ``fields`` and return it as written.

        The record is ``{"seq", "time", "kind", **fields, "prev", "hash"}``: ``seq`` follows
        the last record in the file (1 for an empty or missing log), ``prev`` is that record's
        hash (``GENESIS`` for the first), ``time`` is UTC to the second. The line is flushed
        and fsynced before this returns. ``kind`` is positional-only, so that a field called
        "kind" reaches the reserved-name check rather than Python's argument binding.

        Raises ValueError if ``kind`` is empty, if a field uses one of the reserved names
        (seq, time, kind, prev, hash) or holds a float that JSON cannot represent (NaN,
        infinity); TypeError if a field is not JSON-serialisable. Nothing is written then.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"audit record kind must be a non-empty string, not {kind!r}")
        clash = sorted(set(fields) & set(RESERVED))
        if clash:
            raise ValueError(
                f"audit record field name(s) {', '.join(clash)} are reserved: "
                f"{', '.join(RESERVED)} are set by the log itself"
            )
        json.dumps(fields, allow_nan=False)  # refuse what cannot be written before taking the lock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                size = f.seek(0, os.SEEK_END)
                last = _last_record(f, size)
                record: dict[str, Any] = {
                    "seq": last["seq"] + 1 if last else 1,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "kind": kind,
                    **fields,
                    "prev": last["hash"] if last else GENESIS,
                }
                record["hash"] = record_hash(record)
                line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False) + "\n"
                if size and not _ends_with_newline(f, size):
                    line = "\n" + line  # a torn last line (crash mid-write) stays on its own line
                f.write(line.encode("utf-8"))  # O_APPEND: lands at the end whatever was read
                f.flush()
                os.fsync(f.fileno())
                if size == 0:
                    _fsync_dir(self.path.parent)
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return record


def read_records(site_dir: Path) -> list[dict[str, Any]]:
    """All records of a site's audit log, in file order; an empty list if there is no log.

    Records are returned as parsed, without checking the chain (that is ``verify``'s job).
    Raises AuditError naming the line if a line is not a JSON object.
    """
    records = []
    for number, text in _lines(audit_path(site_dir)):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise AuditError(f"{audit_path(site_dir)} line {number} is not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise AuditError(f"{audit_path(site_dir)} line {number} is not a JSON object")
        records.append(record)
    return records


def verify(site_dir: Path) -> list[str]:
    """Check a site's audit log chain; return one sentence per problem, none if it is intact.

    Each record must hash to its stored ``hash``, carry the next ``seq``, and hold in ``prev``
    the hash of the record before it (``GENESIS`` for record 1). Reported, naming the record
    and its line: a record edited after it was written; records missing from the middle or
    the start; records out of order or repeated; a line that is not a record at all
    (truncated or corrupted); a record that does not chain to its predecessor (for instance
    because that one was edited and its hash recomputed). An empty or missing log is clean.

    A chain cannot show that records were removed from its end: a log cut short after
    record n verifies exactly like a log that only ever had n records. Detecting that needs
    the latest hash kept somewhere the log's writer cannot reach (the hub, a receipt);
    nothing here stores one.
    """
    problems: list[str] = []
    entries: list[tuple[int, dict[str, Any]]] = []
    for number, text in _lines(audit_path(site_dir)):
        record, why = _parse(text)
        if record is None:
            problems.append(f"line {number} is not a valid audit record: {why}")
        else:
            entries.append((number, record))

    first_line: dict[int, int] = {}
    for number, record in entries:
        first_line.setdefault(record["seq"], number)

    seen: dict[int, int] = {}
    previous: tuple[int, dict[str, Any]] | None = None  # the record with the highest seq so far
    for number, record in entries:
        seq = record["seq"]
        if record_hash(record) != record["hash"]:
            problems.append(f"record {seq} (line {number}) was edited: its hash does not match its content")
        if seq in seen:
            problems.append(f"record {seq} appears twice (lines {seen[seq]} and {number})")
            continue
        seen[seq] = number
        if previous is not None and seq < previous[1]["seq"]:
            problems.append(
                f"record {seq} (line {number}) is out of order: "
                f"it comes after record {previous[1]['seq']} (line {previous[0]})"
            )
            continue
        expected = previous[1]["seq"] + 1 if previous else 1
        if seq > expected:
            skipped = range(expected, seq)
            missing = [s for s in skipped if s not in first_line]
            elsewhere = [s for s in skipped if s in first_line]
            if missing:
                verb = "is" if len(missing) == 1 else "are"
                problems.append(f"{_name_seqs(missing)} {verb} missing (line {number} holds record {seq})")
            if elsewhere:
                s = elsewhere[0]
                problems.append(
                    f"record {seq} (line {number}) is out of order: "
                    f"record {s}, which should come before it, is on line {first_line[s]}"
                )
        elif previous is None:
            if record["prev"] != GENESIS:
                problems.append(
                    f"record {seq} (line {number}) does not start the chain: its prev is not the genesis hash"
                )
        elif record["prev"] != previous[1]["hash"]:
            problems.append(
                f"record {seq} (line {number}) does not follow record {previous[1]['seq']} "
                f"(line {previous[0]}): its prev is not that record's hash"
            )
        previous = (number, record)
    return problems


def show(site_dir: Path, last: int | None = None) -> list[str]:
    """One line per record, oldest first: ``#seq time kind key=value ...``.

    Every field but ``prev`` and ``hash`` is shown, in the record's own order; values longer
    than ``SHOW_WIDTH`` characters are cut short with "…". ``last`` limits the output to the
    newest ``last`` records. Raises AuditError if the log cannot be read (see read_records).
    """
    if last is not None and last < 0:
        raise ValueError(f"last must be zero or more, not {last}")
    records = read_records(site_dir)
    if last is not None:
        records = records[len(records) - last :] if last else []
    lines = []
    for record in records:
        head = [f"#{record.get('seq', '?')}", str(record.get("time", "?")), str(record.get("kind", "?"))]
        rest = [
            f"{key}={_short(value)}"
            for key, value in record.items()
            if key not in ("seq", "time", "kind", "prev", "hash")
        ]
        lines.append(" ".join(head + rest))
    return lines


def _short(value: Any) -> str:
    if isinstance(value, str) and value and not any(c.isspace() for c in value):
        text = value
    else:  # quoted when it would otherwise run into the next key=value pair
        text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOW_WIDTH else text[: SHOW_WIDTH - 1] + "…"


def _name_seqs(seqs: list[int]) -> str:
    if len(seqs) == 1:
        return f"record {seqs[0]}"
    if seqs == list(range(seqs[0], seqs[-1] + 1)):
        return f"records {seqs[0]} to {seqs[-1]}"
    return "records " + ", ".join(str(s) for s in seqs[:-1]) + f" and {seqs[-1]}"


def _lines(path: Path) -> list[tuple[int, str]]:
    """The lines of ``path`` numbered from 1, without the newline that ends the last one."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    texts = data.decode("utf-8", errors="replace").split("\n")
    if texts[-1] == "":
        texts.pop()
    return list(enumerate(texts, start=1))


def _parse(text: str | bytes) -> tuple[dict[str, Any] | None, str]:
    """A line as an audit record, or None and why it is not one."""
    try:
        record = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "it is not JSON (truncated or corrupted)"
    if not isinstance(record, dict):
        return None, "it is not a JSON object"
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return None, "it has no valid seq"
    if not isinstance(record.get("prev"), str) or not isinstance(record.get("hash"), str):
        return None, "it has no prev or hash"
    return record, ""


def _last_record(f: BinaryIO, size: int) -> dict[str, Any] | None:
    """The last line of ``f`` that is a record, read backwards from the end in blocks."""
    pos = size
    partial = b""
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        f.seek(pos)
        lines = (f.read(step) + partial).split(b"\n")
        partial = lines.pop(0) if pos > 0 else b""  # may start mid-line: finish it next block
        for raw in reversed(lines):
            record, _ = _parse(raw) if raw.strip() else (None, "")
            if record is not None:
                return record
    return None


def _ends_with_newline(f: BinaryIO, size: int) -> bool:
    f.seek(size - 1)
    return f.read(1) == b"\n"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
