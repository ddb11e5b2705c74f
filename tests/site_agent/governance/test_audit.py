from __future__ import annotations

import json
import multiprocessing
import re
from pathlib import Path
from typing import Any

import pytest

from site_agent.governance.audit import (
    GENESIS,
    AuditError,
    AuditLog,
    audit_path,
    read_records,
    record_hash,
    show,
    verify,
)


def _three(site: Path) -> list[dict[str, Any]]:
    log = AuditLog(site)
    return [
        log.append("decision", project="heart", researcher="alice", verdict="pending"),
        log.append("decision", project="heart", researcher="bob", verdict="approved"),
        log.append("outcome", project="heart", task="train", status="ok", rows=303),
    ]


def _lines(site: Path) -> list[str]:
    return audit_path(site).read_text().splitlines()


def _write_lines(site: Path, lines: list[str]) -> None:
    audit_path(site).write_text("".join(line + "\n" for line in lines))


def test_three_appends_verify_clean_and_read_back(tmp_path: Path) -> None:
    written = _three(tmp_path)
    assert audit_path(tmp_path) == tmp_path / "audit" / "audit.jsonl"
    assert len(_lines(tmp_path)) == 3
    assert read_records(tmp_path) == written
    assert [r["seq"] for r in written] == [1, 2, 3]
    assert [r["kind"] for r in written] == ["decision", "decision", "outcome"]
    assert list(written[0]) == ["seq", "time", "kind", "project", "researcher", "verdict", "prev", "hash"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", written[0]["time"])
    assert verify(tmp_path) == []


def test_records_chain_from_genesis(tmp_path: Path) -> None:
    records = _three(tmp_path)
    assert records[0]["prev"] == GENESIS
    for before, after in zip(records, records[1:], strict=False):
        assert after["prev"] == before["hash"]
    for record in records:
        assert record["hash"] == record_hash(record)
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", record["hash"])
    assert len({r["hash"] for r in records}) == 3


def test_record_hash_is_canonical_and_ignores_hash_key() -> None:
    a = {"seq": 1, "kind": "x", "note": "é"}
    b = {"note": "é", "kind": "x", "seq": 1, "hash": "sha256:whatever"}
    assert record_hash(a) == record_hash(b)
    assert record_hash(a) != record_hash({**a, "note": "e"})


def test_empty_or_missing_log_is_clean(tmp_path: Path) -> None:
    assert read_records(tmp_path) == [] and verify(tmp_path) == [] and show(tmp_path) == []
    audit_path(tmp_path).parent.mkdir()
    audit_path(tmp_path).write_text("")
    assert read_records(tmp_path) == [] and verify(tmp_path) == []
    assert AuditLog(tmp_path).append("decision")["seq"] == 1


def test_edited_middle_record_is_named(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    edited = json.loads(lines[1])
    edited["verdict"] = "rejected"
    lines[1] = json.dumps(edited)
    _write_lines(tmp_path, lines)
    assert verify(tmp_path) == ["record 2 (line 2) was edited: its hash does not match its content"]


def test_edited_record_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    edited = json.loads(lines[1])
    edited["verdict"] = "rejected"
    edited["hash"] = record_hash(edited)
    lines[1] = json.dumps(edited)
    _write_lines(tmp_path, lines)
    problems = verify(tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("record 3 (line 3) does not follow record 2 (line 2)")


def test_deleted_middle_record_is_reported_as_a_gap(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    _write_lines(tmp_path, [lines[0], lines[2]])
    assert verify(tmp_path) == ["record 2 is missing (line 2 holds record 3)"]


def test_deleted_first_records_are_reported(tmp_path: Path) -> None:
    _three(tmp_path)
    _write_lines(tmp_path, _lines(tmp_path)[2:])
    assert verify(tmp_path) == ["records 1 to 2 are missing (line 1 holds record 3)"]


def test_swapped_lines_are_reported_as_out_of_order(tmp_path: Path) -> None:
    _three(tmp_path)
    AuditLog(tmp_path).append("outcome", status="ok")
    lines = _lines(tmp_path)
    lines[1], lines[2] = lines[2], lines[1]
    _write_lines(tmp_path, lines)
    problems = verify(tmp_path)
    assert problems == [
        "record 3 (line 2) is out of order: record 2, which should come before it, is on line 3",
        "record 2 (line 3) is out of order: it comes after record 3 (line 2)",
    ]
    assert not any("missing" in p for p in problems)


def test_duplicated_record_is_reported(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    _write_lines(tmp_path, [lines[0], lines[1], lines[1], lines[2]])
    assert verify(tmp_path) == ["record 2 appears twice (lines 2 and 3)"]


def test_garbage_line_is_reported_with_its_line_number(tmp_path: Path) -> None:
    _three(tmp_path)
    lines = _lines(tmp_path)
    _write_lines(tmp_path, [lines[0], "{not json", lines[1], lines[2]])
    problems = verify(tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith("line 2 is not a valid audit record")
    with pytest.raises(AuditError, match="line 2 is not valid JSON"):
        read_records(tmp_path)


def test_torn_last_line_is_reported_and_appends_continue_the_chain(tmp_path: Path) -> None:
    _three(tmp_path)
    path = audit_path(tmp_path)
    with open(path, "a") as f:
        f.write('{"seq":4,"time":"2026-')  # a crash mid-write: no newline
    assert verify(tmp_path) == ["line 4 is not a valid audit record: it is not JSON (truncated or corrupted)"]
    record = AuditLog(tmp_path).append("outcome", status="ok")
    assert record["seq"] == 4 and record["prev"] == _three_hash(tmp_path)
    assert len(_lines(tmp_path)) == 5
    assert verify(tmp_path) == ["line 4 is not a valid audit record: it is not JSON (truncated or corrupted)"]


def _three_hash(site: Path) -> str:
    return json.loads(_lines(site)[2])["hash"]


def test_tail_read_spans_several_blocks(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    for i in range(3):
        log.append("outcome", blob="x" * 20000, i=i)  # each line longer than a read block
    assert log.append("outcome", i=3)["seq"] == 4
    assert verify(tmp_path) == []


def _append_many(site: str, worker: int, barrier: Any) -> None:
    log = AuditLog(Path(site))
    barrier.wait()
    for i in range(50):
        log.append("outcome", worker=worker, i=i)


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    records = read_records(tmp_path)
    assert [r["seq"] for r in records] == list(range(1, 101))
    for worker in (0, 1):
        assert [r["i"] for r in records if r["worker"] == worker] == list(range(50))
    assert verify(tmp_path) == []


@pytest.mark.parametrize("name", ["seq", "time", "kind", "prev", "hash"])
def test_reserved_field_names_are_rejected(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="reserved"):
        AuditLog(tmp_path).append("decision", **{name: "x"})
    assert read_records(tmp_path) == []


def test_unserialisable_fields_are_rejected_before_writing(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    with pytest.raises(TypeError):
        log.append("decision", when=object())
    with pytest.raises(ValueError):
        log.append("decision", score=float("nan"))
    with pytest.raises(ValueError):
        log.append("")
    assert read_records(tmp_path) == []


def test_show_summarises_records_and_shortens_long_values(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    log.append("decision", project="heart", researcher="alice", verdict="pending")
    log.append("outcome", project="heart", error="E" * 200, note="two words")
    lines = show(tmp_path)
    assert len(lines) == 2
    assert re.fullmatch(
        r"#1 \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ decision project=heart researcher=alice verdict=pending", lines[0]
    )
    assert " outcome " in lines[1]
    assert "error=" + "E" * 59 + "…" in lines[1]
    assert "E" * 60 not in lines[1]
    assert 'note="two words"' in lines[1]
    assert "prev=" not in lines[0] and "hash=" not in lines[0]
    assert show(tmp_path, last=1) == lines[1:]
    assert show(tmp_path, last=0) == []
