"""``flip-site doctor``: what protects task code on this host, and whether the site is ready."""

from __future__ import annotations

from pathlib import Path

import pytest

from site_agent.cli import main


def test_doctor_lists_each_protection_and_the_sites_readiness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", str(tmp_path / "leeds"), "--name", "Leeds"]) == 0
    capsys.readouterr()
    assert main(["doctor", str(tmp_path / "leeds")]) == 0  # this host isolates task processes
    lines = capsys.readouterr().out.splitlines()
    held = {line.split()[1]: line.split()[0] for line in lines if line.startswith("  ")}
    assert {k: held[k] for k in ("network", "files", "scratch", "logs", "memory", "time")} == dict.fromkeys(
        ("network", "files", "scratch", "logs", "memory", "time"), "ok"
    )
    assert held["keys"] == "NO" and held["joined"] == "NO"  # no key pair yet, no federation joined
    assert lines[-1] == "Leeds: 0 dataset(s); task processes can run here"


def test_doctor_refuses_a_site_whose_policy_does_not_parse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", str(tmp_path / "leeds"), "--name", "Leeds"])
    toml = tmp_path / "leeds" / "site.toml"
    toml.write_text(toml.read_text() + "\n[policy]\ndisclosure_threshold = 'ten'\n")
    assert main(["doctor", str(tmp_path / "leeds")]) == 2
    assert "disclosure_threshold" in capsys.readouterr().err
