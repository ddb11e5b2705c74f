"""The warm starter of Flower's per-run ServerApp process, and the Flower entry points it relies on."""

from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from coordinator.serverapp_zygote import ENV_SOCKET, write_launcher
from flip_core.util import wait_until


def test_flower_starts_the_serverapp_by_a_bare_command_name_found_on_path() -> None:
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    assert TASK_TYPE_TO_COMMAND[TaskType.SERVER_APP] == "flwr-serverapp"
    assert "TASK_TYPE_TO_COMMAND[spec.task_type]" in inspect.getsource(SubprocessExecutor.launch)


def test_flower_serverapp_entry_point_reads_its_arguments_from_sys_argv() -> None:
    from flwr.superlink.cli import flwr_serverapp

    assert inspect.signature(flwr_serverapp).parameters == {}
    assert ".parse_args()" in inspect.getsource(flwr_serverapp)


@pytest.fixture
def zygote(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    sock, log = tmp_path / "z.sock", tmp_path / "zygote.log"
    launcher = write_launcher(tmp_path / "bin")
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "coordinator.serverapp_zygote", "--socket", str(sock)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )

    def listening() -> bool:
        if process.poll() is not None:
            return True
        with socket.socket(socket.AF_UNIX) as probe:
            return probe.connect_ex(str(sock)) == 0

    try:
        assert wait_until(listening, 60, 0.05) and process.poll() is None, log.read_text()
        yield launcher, sock, log
    finally:
        process.terminate()
        process.wait(timeout=10)


def run_launcher(launcher: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, ENV_SOCKET: str(sock)}
    return subprocess.run([str(launcher), *args], env=env, capture_output=True, text=True, timeout=60)


def test_the_launcher_runs_flwr_serverapp_forked_from_the_warm_starter(zygote: tuple[Path, Path, Path]) -> None:
    launcher, sock, log = zygote
    shown = run_launcher(launcher, sock, "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: flwr-serverapp"), shown
    assert "started flwr-serverapp as pid" in log.read_text()
    refused = run_launcher(launcher, sock)  # no token: Flower's argparse exits 2, and that status comes back
    assert refused.returncode == 2 and "--token --token-file is required" in refused.stderr, refused


def test_without_the_warm_starter_the_launcher_runs_the_real_flwr_serverapp(tmp_path: Path) -> None:
    launcher = write_launcher(tmp_path / "bin")
    shown = run_launcher(launcher, tmp_path / "nobody-listens.sock", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: flwr-serverapp"), shown
