"""The task sandbox (``site_agent.sandbox``), entered by real child processes as the task process enters it.

Run as root (CI is): the sandboxed child becomes the task user. Every check that something is refused
also shows, where it matters, that the same call works outside the sandbox.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from site_agent.sandbox import REFUSED

ENTER = """
import json, os, sys
from pathlib import Path
from site_agent import sandbox
from site_agent.sandbox import isolation
scratch = Path({scratch!r})
box = sandbox.Sandbox(read=tuple(map(Path, isolation.SYSTEM_READ)) + tuple(isolation.python_paths()),
                      write=(scratch,), user={user}, nproc={nproc})
from site_agent.sandbox.handed import sealed, take
handed = {{p: sealed(Path(p).read_bytes()) for p in {handed!r}}}  # as the agent hands a run its rows
sandbox.enter(box)
"""


REPO = Path(__file__).resolve().parents[3]


def python(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``code`` in a child Python started in the checkout (so it imports this FLIP)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO)


def last_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    said: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return said


def sandboxed(
    tmp_path: Path, body: str, *, handed: tuple[str, ...] = (), nproc: int = 64, user: str = "sandbox.task_user()"
) -> dict[str, object]:
    """Run ``body`` in a sandboxed child; the JSON object it prints last."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    scratch.chmod(0o777)
    code = ENTER.format(scratch=str(scratch), handed=list(handed), nproc=nproc, user=user) + body
    return last_json(python(code, 120))


def test_the_sandboxed_process_is_pid_1_unprivileged_and_sees_only_itself(tmp_path: Path) -> None:
    said = sandboxed(
        tmp_path,
        """
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
print(json.dumps({"pid": os.getpid(), "uid": os.getuid(), "procs": [p for p in os.listdir("/proc") if p.isdigit()],
                  "caps": status["CapEff"].strip(), "bounding": status["CapBnd"].strip(),
                  "no_new_privs": status["NoNewPrivs"].strip(), "host": os.uname().nodename}))
""",
    )
    assert said["pid"] == 1 and said["procs"] == ["1"]
    if os.geteuid() == 0:
        assert said["uid"] != 0  # the task user
    assert said["caps"] == said["bounding"] == "0000000000000000" and said["no_new_privs"] == "1"
    assert said["host"] == "flip-task"


def test_an_agent_that_is_not_root_builds_it_in_a_user_namespace_and_keeps_no_capability(tmp_path: Path) -> None:
    # user=None is the path of an unprivileged agent (the site container's): its own user namespace, whose
    # capabilities it drops; run here by root, it takes the same steps
    said = sandboxed(
        tmp_path,
        """
status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
(scratch / "own").write_text("ok")
uid_map = Path("/proc/self/uid_map").read_text().split()
print(json.dumps({"pid": os.getpid(), "caps": status["CapEff"].strip(), "bounding": status["CapBnd"].strip(),
                  "no_new_privs": status["NoNewPrivs"].strip(), "uid_map": uid_map,
                  "shadow": os.path.exists("/etc/shadow")}))
""",
        user="None",
    )
    assert said["pid"] == 1 and said["caps"] == said["bounding"] == "0000000000000000"
    assert said["no_new_privs"] == "1" and said["shadow"] is False
    assert said["uid_map"] == ["0", str(os.getuid()), "1"]  # one user: the agent's own


def test_nothing_private_of_the_host_is_there(tmp_path: Path) -> None:
    secret = tmp_path / "site" / "keys" / "Leeds.key"
    secret.parent.mkdir(parents=True)
    secret.write_text("PRIVATE KEY")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host_socket = str(tmp_path / "docker.sock")
    listener.bind(host_socket)
    listener.listen(1)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(host_socket)  # outside, it answers
        probe.close()
        said = sandboxed(
            tmp_path,
            f"""
import socket
seen = {{p: os.path.exists(p) for p in ("/etc/shadow", "/root/.bash_history", {str(secret)!r}, "/var/run",
                                          "/home", {str(Path.cwd())!r} + "/pyproject.toml")}}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({host_socket!r})
    reached = True
except OSError:
    reached = False
writes = {{}}
for place in ("/", "/usr/lib", "/etc", str(scratch)):
    try:
        (Path(place) / "flip-planted").write_text("x")
        writes[place] = True
    except OSError:
        writes[place] = False
print(json.dumps({{"seen": seen, "reached": reached, "writes": writes}}))
""",
        )
    finally:
        listener.close()
    assert not any(said["seen"].values()), said["seen"]  # type: ignore[union-attr]
    assert said["reached"] is False
    assert said["writes"] == {"/": False, "/usr/lib": False, "/etc": False, str(tmp_path / "scratch"): True}


def test_what_the_agent_hands_is_read_from_a_sealed_file_whatever_the_sites_modes(tmp_path: Path) -> None:
    table = tmp_path / "table.csv"
    table.write_text("age\n63\n")
    table.chmod(0o600)  # readable by the agent's user only
    said = sandboxed(
        tmp_path,
        f"""
fd = handed[{str(table)!r}]
try:
    os.pwrite(fd, b"70", 4)
    changed = True
except OSError:
    changed = False
content = take(fd).decode()
try:
    os.fstat(fd)
    still_open = True
except OSError:
    still_open = False
try:
    open({str(table)!r}).read()
    direct = True
except OSError:
    direct = False
print(json.dumps({{"content": content, "changed": changed, "still_open": still_open, "direct": direct}}))
""",
        handed=(str(table),),
    )
    assert said == {"content": "age\n63\n", "changed": False, "still_open": False, "direct": False}


def test_a_fork_bomb_stops_at_the_process_limit(tmp_path: Path) -> None:
    said = sandboxed(
        tmp_path,
        """
children, refused = [], False
for _ in range(200):
    try:
        pid = os.fork()
    except BlockingIOError:
        refused = True
        break
    if pid == 0:
        import signal
        signal.pause()  # alive until its namespace ends
        os._exit(0)
    children.append(pid)
print(json.dumps({"started": len(children), "refused": refused}))
""",
        nproc=20,
    )
    assert said["refused"] is True and said["started"] < 20


REFUSED_CALLS = """
import ctypes, errno, platform
from site_agent import sandbox
libc = ctypes.CDLL(None, use_errno=True)
NR = {{"x86_64": {{"ptrace": 101, "mount": 165, "unshare": 272, "bpf": 321, "kexec_load": 246, "reboot": 169,
                  "init_module": 175, "keyctl": 250, "adjtimex": 159, "open_by_handle_at": 304, "clone": 56,
                  "clone3": 435, "swapon": 167, "perf_event_open": 298, "io_uring_setup": 425}},
      "aarch64": {{"ptrace": 117, "mount": 40, "unshare": 97, "bpf": 280, "kexec_load": 104, "reboot": 142,
                   "init_module": 105, "keyctl": 219, "adjtimex": 171, "open_by_handle_at": 265, "clone": 220,
                   "clone3": 435, "swapon": 224, "perf_event_open": 241, "io_uring_setup": 425}}}}[platform.machine()]
tries = {{  # each harmless where it is allowed: a query, a bad argument or a missing file
    "tracing": ("ptrace", 0x4206, 0, 0, 0),  # PTRACE_INTERRUPT on pid 0: ESRCH where allowed
    "mounts": ("mount", b"none", b"/nonexistent", b"tmpfs", 0, 0),
    "namespaces": ("unshare", 0x04000000),  # CLONE_NEWUTS
    "kernel": ("reboot", 0, 0, 0, 0),  # a wrong magic number: EINVAL where allowed
    "keys": ("keyctl", 0, 0, 0, 0),  # KEYCTL_GET_KEYRING_ID of keyring 0: an error where allowed
    "clock": ("adjtimex", None),
    "handles": ("open_by_handle_at", -1, 0, 0),
    "io_uring": ("io_uring_setup", 1, 0),  # no parameters: EFAULT where allowed
}}
{setup}
out = {{}}
for kind, (name, *args) in tries.items():
    if kind == "clock":
        buf = ctypes.create_string_buffer(256)  # struct timex, modes 0: only reads the clock
        args = [buf]
    ctypes.set_errno(0)
    result = libc.syscall(NR[name], *args)
    out[kind] = errno.errorcode.get(ctypes.get_errno(), "0") if result == -1 else "ok"
ctypes.set_errno(0)
new_ns_clone = libc.syscall(NR["clone"], 0x04000000 | 17, 0, 0, 0, 0)  # CLONE_NEWUTS | SIGCHLD
if new_ns_clone == 0:
    os._exit(0)
out["clone"] = errno.errorcode.get(ctypes.get_errno(), "0") if new_ns_clone == -1 else "ok"
ctypes.set_errno(0)
out["clone3"] = errno.errorcode.get(ctypes.get_errno(), "0") if libc.syscall(NR["clone3"], 0, 0) == -1 else "ok"
pid = os.fork()  # a plain fork is still fine
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps(out))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does each call class succeed without the filter")
def test_each_refused_call_class_is_refused_by_the_filter_and_not_before() -> None:
    def run(setup: str) -> dict[str, str]:
        return last_json(python("import json, os\n" + REFUSED_CALLS.format(setup=setup)))

    free, filtered = run(""), run("sandbox.install_seccomp()")
    assert set(REFUSED) == {"tracing", "mounts", "namespaces", "kernel", "keys", "clock", "handles", "io_uring"}
    assert all(free[kind] != "EPERM" for kind in (*REFUSED, "clone")), free  # root may: the filter decides
    assert {kind: filtered[kind] for kind in (*REFUSED, "clone")} == dict.fromkeys((*REFUSED, "clone"), "EPERM")
    assert filtered["clone3"] == "ENOSYS"  # the C library then falls back to clone, which the filter reads


def test_the_sandboxed_process_dies_with_the_process_that_waits_for_it(tmp_path: Path) -> None:
    import signal

    from flip_core.util import wait_until

    scratch = tmp_path / "scratch"
    scratch.mkdir()
    scratch.chmod(0o777)
    marker = scratch / "alive"
    code = ENTER.format(scratch=str(scratch), handed=[], nproc=64, user="sandbox.task_user()") + (
        f"import signal\nPath({str(marker)!r}).write_text(str(os.getpid()))\nwhile True:\n    signal.pause()\n"
    )
    outer = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    try:
        assert wait_until(marker.exists, 60), "the sandboxed child did not start"
        children = [int(p) for p in Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()]
        assert len(children) == 1 and Path(f"/proc/{children[0]}").exists()
        os.killpg(outer.pid, signal.SIGKILL)  # as the agent stops a task at its time limit
        outer.wait()
        assert wait_until(lambda: not Path(f"/proc/{children[0]}").exists(), 10), "the child outlived its waiter"
    finally:
        if outer.poll() is None:
            outer.kill()


def test_a_process_with_threads_is_told_it_cannot_enter() -> None:
    code = (
        "import threading, time\nfrom pathlib import Path\nfrom site_agent import sandbox\n"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "try:\n    sandbox.enter(sandbox.Sandbox(read=(), write=()))\n"
        "except sandbox.SandboxError as exc:\n    print(exc)\n"
    )
    done = python(code)
    assert done.stdout.strip() == "the task process has 2 threads before its sandbox (it must have one)", done.stderr
