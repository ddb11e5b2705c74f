"""The limits a sandboxed task process holds to (``site_agent.sandbox``), tried in real child processes entered as
a task process enters its sandbox: its scratch's size, any file's size, its processes counted apart from every other
task process's, no host view, no socket but its own Unix ones, no io_uring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from site_agent.sandbox.namespaces import PROC_KEPT

REPO = Path(__file__).resolve().parents[3]
ENTER = """
import json, os, sys
from pathlib import Path
from site_agent import sandbox
from site_agent.sandbox import isolation
scratch = Path({scratch!r})
box = sandbox.Sandbox(read=tuple(map(Path, isolation.SYSTEM_READ)) + tuple(isolation.python_paths()),
                      write=(scratch,), user=sandbox.task_user(), nproc={nproc}, scratch_mb={scratch_mb},
                      file_mb={file_mb})
sandbox.enter(box)
"""


def entering(tmp_path: Path, body: str, *, nproc: int = 64, scratch_mb: int | None = 4, file_mb: int | None = 2) -> str:
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    scratch.chmod(0o777)
    return ENTER.format(scratch=str(scratch), nproc=nproc, scratch_mb=scratch_mb, file_mb=file_mb) + body


def sandboxed(tmp_path: Path, body: str, **sizes: Any) -> dict[str, Any]:
    """Run ``body`` in a sandboxed child; the JSON object it prints last."""
    done = subprocess.run(
        [sys.executable, "-c", entering(tmp_path, body, **sizes)], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    said: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return said


WRITE = """
import errno
def write(path, mib):
    try:
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(bytes(1 << 20))
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
"""


def test_the_scratch_is_a_tmpfs_of_its_size_and_a_file_stops_at_its_limit(tmp_path: Path) -> None:
    said = sandboxed(
        tmp_path,
        WRITE
        + """
big = write(scratch / "big", 3)  # past the file size (2 MiB)
fills = [write(scratch / f"part-{n}", 1) for n in range(8)]  # past the scratch (4 MiB)
print(json.dumps({"big": big, "fills": fills, "size": os.statvfs(scratch).f_blocks * os.statvfs(scratch).f_frsize}))
""",
    )
    assert said["big"] == "EFBIG"
    assert "ENOSPC" in said["fills"] and said["fills"][0] == "ok"
    assert said["size"] == 4 << 20
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing of it reached the host's disk


def test_without_a_scratch_size_the_hosts_folder_is_bound_as_before(tmp_path: Path) -> None:
    said = sandboxed(tmp_path, 'print(json.dumps({"wrote": (scratch / "kept").write_text("x")}))', scratch_mb=None)
    assert said == {"wrote": 1} and (tmp_path / "scratch" / "kept").read_text() == "x"


def test_no_view_of_the_host_is_left_in_sys_or_proc(tmp_path: Path) -> None:
    said = sandboxed(
        tmp_path,
        """
def shown(path):
    try:
        return bool(os.listdir(path) if os.path.isdir(path) else open(path).read(1))
    except OSError:
        return False
names = [n for n in os.listdir("/proc") if not n.isdigit()]
print(json.dumps({"shown": {n: shown("/proc/" + n) for n in names}, "cgroup": os.path.exists("/sys/fs/cgroup"),
                  "sys": sorted(os.listdir("/sys")), "own": shown("/proc/self/status"), "cpus": os.cpu_count()}))
""",
    )
    assert said["cgroup"] is False and said["sys"] == ["devices"]  # /sys/devices/system/cpu only
    shown = {name for name, seen in said["shown"].items() if seen}
    assert shown <= set(PROC_KEPT), shown  # every other entry of /proc is empty: the host's cmdline, load, ...
    assert said["own"] is True and said["cpus"] >= 1


NPROC = """
import threading
threading.stack_size(1 << 16)
hold = threading.Event()
started = 0
try:
    for _ in range(1000):
        threading.Thread(target=hold.wait, daemon=True).start()
        started += 1
except RuntimeError:
    pass
print(json.dumps({"started": started}), flush=True)
sys.stdin.readline()  # holds its threads until told
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="every task process as the same task user: an agent that is root")
def test_each_task_process_counts_its_threads_apart_from_every_other(tmp_path: Path) -> None:
    # the first takes every thread its limit allows and holds them; the second, as the same task user, gets as many
    first = subprocess.Popen(
        [sys.executable, "-c", entering(tmp_path, NPROC, nproc=40)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert first.stdout is not None and first.stdin is not None
        held = json.loads(first.stdout.readline())
        second = sandboxed(tmp_path, NPROC.replace("sys.stdin.readline()", "pass"), nproc=40)
    finally:
        first.communicate("\n", timeout=60)
    assert held["started"] > 30 and held["started"] < 40
    assert second["started"] == held["started"]


SOCKETS = """
import ctypes, errno, socket
def opened(family, kind=socket.SOCK_STREAM):
    try:
        socket.socket(family, kind).close()
    except OSError as exc:
        return errno.errorcode[exc.errno]
    return "ok"
libc = ctypes.CDLL(None, use_errno=True)
ring = libc.syscall(425, 1, None)  # io_uring_setup
out = {"unix": opened(socket.AF_UNIX), "pair": len(socket.socketpair()), "inet": opened(socket.AF_INET),
       "inet6": opened(socket.AF_INET6), "netlink": opened(socket.AF_NETLINK, socket.SOCK_DGRAM),
       "vsock": opened(socket.AF_VSOCK), "packet": opened(socket.AF_PACKET, socket.SOCK_RAW), "alg": opened(38),
       "io_uring": errno.errorcode.get(ctypes.get_errno(), "0") if ring == -1 else "ok"}
"""


def filtered_child(setup: str) -> dict[str, str]:
    code = "import json\nfrom site_agent import sandbox\n" + setup + "\n" + SOCKETS + "print(json.dumps(out))\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    said: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return said


def test_only_its_own_unix_sockets_and_no_io_uring_are_left_to_a_filtered_process() -> None:
    free, filtered = filtered_child(""), filtered_child("sandbox.install_seccomp()")
    assert free["inet"] == free["netlink"] == "ok" and free["io_uring"] != "EPERM"  # the filter decides
    assert filtered["unix"] == "ok" and filtered["pair"] == 2
    refused = {k: filtered[k] for k in ("inet", "inet6", "netlink", "vsock", "packet", "alg")}
    assert refused == dict.fromkeys(refused, "EAFNOSUPPORT")
    assert filtered["io_uring"] == "EPERM"
