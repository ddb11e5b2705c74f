"""Hostile cells against real site agents: each is stopped or stripped, the notebook says why in a
sentence, nothing the cell saw leaves, the site goes on serving, and its audit log records it.

The sites' policy here: time limit 6 s per step, memory limit 1024 MB per task process, and only the
metrics loss, accuracy and rows may leave.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from flip_core.errors import RunFailed
from flip_core.util import wait_until
from flip_local.federation import status
from flip_local.sites import DEFAULT_PROJECT
from flip_magics.client import FlipClient, RunHandle
from site_agent.data.catalog import load_site
from site_agent.governance.audit import read_records, verify

from helpers import TINY_CELL, local_federation

SITES = ("Cleveland", "Hungary")  # two hospitals: what holds at one holds at each
NPROC = 64  # processes and threads of the task user, at both sites together (a task process has two threads)
POLICY = {
    "policy": {"disclosure_threshold": 10},
    "projects": {
        DEFAULT_PROJECT: {
            "approved": True,
            "researchers": ["*"],
            "datasets": ["*"],
            "auto_approve": True,
            "time_limit_seconds": 6,
            "memory_limit_mb": 1024,
            "metrics": ["loss", "accuracy", "rows"],
        }
    },
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FlipClient, Path, dict]]:
    previous = os.environ.get("FLIP_TASK_NPROC")
    os.environ["FLIP_TASK_NPROC"] = str(NPROC)  # the sites' agents pass it to their task processes
    try:
        with local_federation(tmp_path_factory.mktemp("flip-hostile"), policy=POLICY, sites=len(SITES)) as connection:
            client = FlipClient(connection["coordinator_url"], connection["token"])
            yield client, Path(connection["federation"]) / "sites", connection
    finally:
        if previous is None:
            os.environ.pop("FLIP_TASK_NPROC")
        else:
            os.environ["FLIP_TASK_NPROC"] = previous


def hostile(train_body: str) -> str:
    """TINY_CELL whose train() runs ``train_body`` first (one indented line per line)."""
    body = "\n".join("    " + line for line in train_body.strip().splitlines())
    return (
        TINY_CELL + f"\n_honest_train = train\n\ndef train(model, data, config):\n{body}\n"
        "    return _honest_train(model, data, config)\n"
    )


def failures(client: FlipClient, source: str, name: str) -> tuple[dict[str, str], RunHandle, str]:
    handle = client.train(source, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=0, name=name)
    with pytest.raises(RunFailed) as failed:
        handle.wait(120)
    details = {
        e["site"]: e["detail"] for e in list(handle.events) if e.get("type") == "site" and e["status"] == "failed"
    }
    return details, handle, str(failed.value)


def test_a_cell_cannot_reach_the_network(guarded) -> None:
    client, sites, connection = guarded
    port = connection["coordinator_url"].rsplit(":", 1)[1]
    source = hostile(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)")
    details, _, _ = failures(client, source, "socket")
    assert set(details) == set(SITES)
    # no route in its own network namespace (OSError), and where Landlock has it, no TCP at all (PermissionError)
    assert all(re.fullmatch(r"(OSError|PermissionError) at cell line \d+ in train\(\)", d) for d in details.values())
    outcomes = [r for r in read_records(sites / "Hungary") if r["kind"] == "outcome"]
    assert any(r["outgoing"]["status"] == "error" for r in outcomes)


def test_a_cell_cannot_read_files_outside_its_sites_data(guarded) -> None:
    client, sites, connection = guarded
    home = Path(connection["federation"]).parent
    # the federation's connection file (researcher and site tokens) and another hospital's table
    source = hostile(
        "import pathlib\n"
        f"for path in (pathlib.Path({str(home)!r}) / 'connection.json',\n"
        f"             pathlib.Path({str(sites)!r}) / 'Hungary' / 'site.toml'):\n"
        "    if data.site != 'Hungary' or path.name != 'site.toml':\n"
        "        path.read_text()"
    )
    details, _, _ = failures(client, source, "snoop")
    assert set(details) == set(SITES)
    # not there at all in the task's own root (the sandbox), or refused by Landlock where there is no sandbox
    pattern = r"(FileNotFoundError|PermissionError) at cell line \d+ in train\(\)"
    assert all(re.fullmatch(pattern, d) for d in details.values()), details


def test_a_cell_that_runs_forever_is_stopped_at_the_time_limit(guarded) -> None:
    client, _, _ = guarded
    details, _, reason = failures(client, hostile("while True:\n    pass"), "forever")
    assert details == {s: "TimeLimit in the task process (stopped at its time limit of 6 s)" for s in SITES}
    assert f"--min-sites is {len(SITES)}" in reason


def test_a_cell_that_allocates_without_bound_hits_the_memory_limit(guarded) -> None:
    client, _, _ = guarded
    details, _, _ = failures(
        client, hostile("hoard = []\nwhile True:\n    hoard.append(bytearray(64 * 2**20))"), "hoard"
    )
    assert all(re.fullmatch(r"MemoryLimit at cell line \d+ in train\(\)", d) for d in details.values()), details


def test_rows_in_a_message_or_printed_stay_at_the_site(guarded) -> None:
    client, sites, _ = guarded
    details, handle, reason = failures(
        client,
        hostile(
            "print('ROW', data.train.iloc[0].to_dict())\n"
            "raise ValueError('patient ' + str(data.train.iloc[0].to_dict()))"
        ),
        "leaky",
    )
    assert all(re.fullmatch(r"ValueError at cell line \d+ in train\(\)", d) for d in details.values()), details
    assert "patient" not in reason and "age" not in reason
    assert not any("patient" in str(e) or "'age'" in str(e) for e in list(handle.events))
    log = (sites / "Hungary" / "logs" / f"run-{handle.run_id}.log").read_text()
    assert "ROW {'age'" in log  # the site's own log has it, for its admin


def test_rows_disguised_as_metrics_are_withheld(guarded) -> None:
    client, sites, _ = guarded
    row = "data.train.select_dtypes('number').fillna(0).iloc[0]"
    source = hostile(f"return {{'loss': 0.5, **{{f'v{{i}}': float(v) for i, v in enumerate({row})}}}}")
    handle = client.train(
        source, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=0, name="rows-as-metrics"
    )
    handle.wait(120)
    assert set(handle.history.query("phase == 'train'").metric) == {"loss"}
    said = {
        e["site"]: e["detail"] for e in list(handle.events) if e.get("type") == "site" and e.get("detail")
    }  # the site's row says it when its training step is done
    assert said == {
        s: "train metrics withheld: not among the project's metrics here (loss, accuracy, rows)" for s in SITES
    }
    outcome = [r for r in read_records(sites / "Hungary") if r["kind"] == "outcome" and r["phase"] == "fit"][-1]
    assert outcome["outgoing"]["train_metrics"] == ["loss"] and outcome["stripped"]


def test_parameters_of_the_wrong_shape_are_stripped(guarded) -> None:
    client, sites, _ = guarded
    source = hostile(
        "model.weight = torch.nn.Parameter(torch.tensor(data.train[['age', 'chol']].to_numpy(),"
        " dtype=torch.float32))\nreturn {'loss': 0.0}"
    )
    details, _, _ = failures(client, source, "disguised")
    expected = "BadParameters in train() (the returned parameters do not match the declared model)"
    assert details == {s: expected for s in SITES}
    stripped = [r for r in read_records(sites / "Hungary") if r["kind"] == "outcome" and r["stripped"]]
    assert stripped and stripped[-1]["outgoing"]["params"] == {}


SNOOP = """import os, pathlib
try:  # no other process in view (its own PID namespace; Landlock does not even let it list /proc)
    others = [p for p in os.listdir('/proc') if p.isdigit() and p != '1']
except PermissionError:
    others = []
if others:
    raise RuntimeError('other processes are visible')
refused = []
for attempt in (lambda: list(pathlib.Path.cwd().parent.iterdir()),  # the site's scratch: other runs' folders
                lambda: (pathlib.Path.cwd().parent / 'run-other' / 'notes.txt').read_text(),  # another run's file
                lambda: (pathlib.Path.cwd().parent / 'planted').write_text('x'),
                lambda: list((pathlib.Path.cwd().parents[1] / 'logs').iterdir()),  # the site's logs
                lambda: (pathlib.Path.cwd().parents[1] / 'logs' / 'task-processes.log').read_text(),
                lambda: (pathlib.Path.cwd().parents[1] / 'keys').iterdir().__next__(),  # the site's keys
                lambda: pathlib.Path('/etc/shadow').read_text(),
                lambda: (pathlib.Path.cwd().parents[1] / 'site.toml').read_text(),  # its own catalog and policy
                lambda: pathlib.Path(OTHER_DATA[data.site]).read_bytes(),  # the other hospital's table
                lambda: HOST_SOCKET and __import__('socket').socket(1).connect(HOST_SOCKET),  # a host Unix socket
                lambda: pathlib.Path('/tmp/flip-planted').write_text('x'),  # anywhere else on the host
                *(lambda pid=pid: os.kill(pid, 0) for pid in AGENTS)):  # the site agents
    try:
        attempt()
    except (PermissionError, FileNotFoundError, ProcessLookupError, ConnectionRefusedError):  # refused, not there
        refused.append(True)
    else:
        refused.append(False)
(pathlib.Path.cwd() / 'own.txt').write_text('its own scratch is writable')
if all(refused):
    raise PermissionError('everything else was refused')"""


def test_a_cell_writes_only_its_runs_scratch_and_sees_nothing_else_of_the_host(guarded, tmp_path) -> None:
    client, sites, connection = guarded
    federation = Path(connection["federation"])
    agents = [p["pid"] for p in status(federation.parent)["processes"] if p["name"].startswith("site-")]
    data = {site: load_site(sites / site).datasets["heart-disease"].path for site in SITES}
    other = {site: data[next(s for s in SITES if s != site)] for site in SITES}
    for site in SITES:  # another run's file at each site, as a run still going would have it
        other_run = sites / site / "scratch" / "run-other"
        other_run.mkdir()
        (other_run / "notes.txt").write_text("another project's rows")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a host service's socket, as Docker's is
    host_socket = str(tmp_path / "host.sock")
    listener.bind(host_socket)
    listener.listen(8)
    source = hostile(f"AGENTS = {agents!r}\nOTHER_DATA = {other!r}\nHOST_SOCKET = {host_socket!r}\n" + SNOOP)
    try:
        details, handle, _ = failures(client, source, "scratch")
    finally:
        listener.close()
    raise_line = 1 + next(i for i, line in enumerate(source.splitlines()) if "everything else" in line)
    assert details == {s: f"PermissionError at cell line {raise_line} in train()" for s in SITES}
    for site in SITES:
        scratch = sites / site / "scratch"
        run_scratch = scratch / f"run-{handle.run_id}"
        assert wait_until(lambda folder=run_scratch: not folder.exists(), 10)  # removed just after its last reply
        assert not (scratch / "planted").exists()
        log = (sites / site / "logs" / f"run-{handle.run_id}.log").read_text()
        assert "PermissionError" in log  # the agent wrote the task's output to the run's log
        assert "another project" not in log  # what the cell tried to read was never there for it to print
        outcome = [r for r in read_records(sites / site) if r["kind"] == "outcome" and r["run"] == handle.run_id]
        assert outcome and outcome[-1]["outgoing"]["status"] == "error"  # the audit log records the refusal
    assert not Path("/tmp/flip-planted").exists()


def test_a_fork_bomb_stops_at_the_process_limit(guarded) -> None:
    client, _, _ = guarded
    details, _, _ = failures(client, hostile("import os\nwhile True:\n    os.fork()"), "fork-bomb")
    assert set(details) == set(SITES)
    assert all(re.fullmatch(r"BlockingIOError at cell line \d+ in train\(\)", d) for d in details.values()), details


def test_calls_a_training_task_never_needs_are_refused(guarded) -> None:
    client, _, _ = guarded
    calls = (
        "import ctypes, errno, os, platform\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "keyctl, bpf, adjtimex, handle = {'x86_64': (250, 321, 159, 304),\n"
        "                                 'aarch64': (219, 280, 171, 265)}[platform.machine()]\n"
        "timex = ctypes.create_string_buffer(256)\n"
        "refused = []\n"
        "for call in (lambda: libc.unshare(0x04000000), lambda: libc.mount(b'none', b'/tmp', b'tmpfs', 0, None),\n"
        "             lambda: libc.ptrace(0x4206, 0, 0, 0), lambda: libc.syscall(keyctl, 0, 0, 0, 0),\n"
        "             lambda: libc.syscall(bpf, 0, 0, 0), lambda: libc.syscall(adjtimex, timex),\n"
        "             lambda: libc.syscall(handle, -1, 0, 0)):\n"
        "    ctypes.set_errno(0)\n"
        "    refused.append(call() == -1 and ctypes.get_errno() == errno.EPERM)\n"
        "if all(refused):\n"
        "    raise PermissionError('every call was refused')"
    )
    details, _, _ = failures(client, hostile(calls), "syscalls")
    line = 1 + next(i for i, text in enumerate(hostile(calls).splitlines()) if "every call was refused" in text)
    assert details == {s: f"PermissionError at cell line {line} in train()" for s in SITES}


def test_after_all_that_every_site_still_serves_and_its_audit_chain_holds(guarded) -> None:
    client, sites, _ = guarded  # runs last in this module: after every hostile cell above
    done = client.train(TINY_CELL, dataset="heart-disease", rounds=1, min_sites=len(SITES), seed=0, name="honest").wait(
        120
    )
    assert done.status == "completed", done.reason
    for site in SITES:
        assert verify(sites / site) == []
