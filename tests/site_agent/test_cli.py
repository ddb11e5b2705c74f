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
