"""``flip-site``'s command table and its named exit statuses: every status its ``--help`` documents, and a
dataset's options reaching its format through the registry (a format refuses an option that is not its own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.cli import main
from site_agent.exits import SiteExit
from site_agent.governance.audit import AuditLog


def test_help_lists_every_exit_status_with_its_meaning(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for code in SiteExit:
        assert f"  {int(code)}  {code.meaning.split()[0]}" in text, code


def test_a_wrong_command_line_exits_with_the_usage_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["init"])
    assert done.value.code == SiteExit.REFUSED == 2  # argparse's own status for a usage error


def test_a_table_refuses_an_imaging_option_in_a_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["init", str(tmp_path / "leeds"), "--name", "Leeds"]) == SiteExit.OK
    table = tmp_path / "t.csv"
    table.write_text("age,label\n" + "".join(f"{40 + i},{i % 2}\n" for i in range(20)))
    add = ["dataset", "add", str(tmp_path / "leeds"), "heart", str(table), "--format", "csv"]
    assert main([*add, "--image-column", "age"]) == SiteExit.REFUSED
    assert "dataset format 'csv' takes no option 'image_column'" in capsys.readouterr().err
    assert main([*add, "--stratify", "label"]) == SiteExit.OK
    assert "heart" in capsys.readouterr().out


def test_a_check_that_finds_an_edit_exits_with_the_problems_status(tmp_path: Path) -> None:
    site = tmp_path / "leeds"
    main(["init", str(site), "--name", "Leeds"])
    log = AuditLog(site)
    log.append("query", verdict="allowed")
    assert main(["audit", "verify", str(site)]) == SiteExit.OK
    log.path.write_text(log.path.read_text().replace("allowed", "refused"))
    assert main(["audit", "verify", str(site)]) == SiteExit.PROBLEMS


def test_the_disclosure_report_says_per_project_what_was_told_refused_and_withheld(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site = tmp_path / "leeds"
    main(["init", str(site), "--name", "Leeds"])
    log = AuditLog(site)
    counted = {"dims": ["sex"], "levels": [["0", "1"]], "cells": [None, 120], "total": None}
    common = {"researcher": "alice", "dataset": "heart", "statistic": "count", "threshold": 10}
    log.append("query", project="cardio", text="count by sex", verdict="ok", released=counted, **common,
               ledger_withheld=[{"set": "count by sex: sex=0", "near": "'age > 50: total'"}])  # fmt: skip
    log.append("query", project="cardio", text="count where age > 50 and not (...)", verdict="refused",
               reason="Leeds refused this query: its cohort differs by fewer than 10 rows", **common)  # fmt: skip
    log.append("query", project="other", text="count", verdict="ok", released={"cells": [300], "total": 300},
               **{**common, "researcher": "bob"})  # fmt: skip
    assert main(["disclosure", "report", str(site), "--project", "cardio"]) == SiteExit.OK
    out = capsys.readouterr().out
    assert "project cardio, dataset heart: asked by alice" in out
    assert "1 queries answered, 1 refused; 1 values left, 2 withheld (1 of them by the ledger" in out
    assert "refused 'count where age > 50 and not (...)': Leeds refused this query" in out
    assert "withheld 'count by sex: sex=0': within the threshold of 'age > 50: total'" in out
    assert "project other" not in out and "bob" not in out
    assert main(["disclosure", "report", str(site)]) == SiteExit.OK
    assert "project other, dataset heart: asked by bob" in capsys.readouterr().out
