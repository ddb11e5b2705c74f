"""Limits that hold per run and per site: the red team's attacks on a site's resources and on the kernel's doors.

Each cell tries to stop its site (a result announced too large for the agent to allocate, a log flood, a full disk,
a huge file, the processes every site's tasks share, memory held as shared memory or by children) or to reach past
its sandbox (io_uring, socket families, the host's cgroup tree). Each asserts what the researcher was told (a fixed
sentence naming the site and the limit), that nothing the cell wrapped left, that the site's audit log records it,
and that the sites serve the next run.

The federation's sites run with the default policy and limits (``site_agent.governance.policy.TaskLimits``), but a
run's memory at 2 GiB (``kit.MEMORY_LIMIT_MB``): every limit here is reached in a second or two.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flip_core.util import wait_until
from site_agent.governance.audit import read_records, verify
from site_agent.governance.policy import TaskLimits

from helpers import GATED_CELL, Gate
from kit import RUNS_LIMIT, SITES, Outcome, RedTeam, hostile, still_serves, still_trains

pytestmark = pytest.mark.integration

LIMITS = TaskLimits()  # the red team's sites keep the defaults


def failed_details(outcome: Outcome) -> dict[str, str]:
    """What each site's row said of its failed step."""
    assert outcome.handle is not None
    events = list(outcome.handle.events)
    return {e["site"]: e["detail"] for e in events if e.get("type") == "site" and e.get("status") == "failed"}


def limit_records(team: RedTeam, site: str, outcome: Outcome, limit: str) -> list[dict[str, Any]]:
    assert outcome.handle is not None
    run = outcome.handle.run_id
    records = read_records(team.sites_dir / site)
    return [r for r in records if r["kind"] == "limit" and r["run"] == run and r["limit"] == limit]


def assert_stopped(team: RedTeam, outcome: Outcome, error_type: str, sentence: str, limit: str) -> None:
    """Every site stopped the step at ``limit`` and said so in its one sentence, naming itself; nothing leaked; the
    audit log has the limit and the chain holds; the sites serve the next run."""
    details = failed_details(outcome)
    assert details == {s: f"{error_type} in {sentence.format(site=s)}" for s in SITES}, details
    assert outcome.status == "failed"
    said = " ".join(outcome.said)
    assert all(f"{s}: {error_type} in " in said for s in SITES), said
    assert outcome.leaked() == []
    for site in SITES:
        assert limit_records(team, site, outcome, limit), f"{site}'s audit log has no {limit} limit"
        assert verify(team.sites_dir / site) == []
    still_serves(team)


def test_a_result_announced_larger_than_the_agent_can_hold_is_refused_before_it_is_read(redteam) -> None:
    # the task process's channel to its agent is a descriptor of its own process: it frames a result's header itself,
    # announcing 32 TiB, as the worker announces a result's length before sending it
    body = """
import os, struct, sys
fd = int(sys.argv[sys.argv.index('--fd') + 1])
told = b'step:' + str(2 ** 45).encode()
os.write(fd, struct.pack('!i', len(told)) + told)
"""
    outcome = redteam.train(hostile(body), "announce-huge")
    sentence = "the task process (its result passed {site}'s limit on a step's result: the step's own size and 1 MiB)"
    assert_stopped(redteam, outcome, "ResultLimit", sentence, "result")


def test_flooding_the_sites_log_is_cut_at_its_limit_and_the_run_goes_on(redteam) -> None:
    body = """
import sys
for _ in range(24):
    sys.stdout.write('x' * (1 << 20) + '\\n')
sys.stdout.flush()
"""
    outcome = redteam.train(hostile(body), "log-flood")
    assert outcome.status == "completed", outcome.said
    assert outcome.handle is not None
    run = outcome.handle.run_id
    cut = f"{LIMITS.log_limit_lines} lines or {LIMITS.log_limit_mb:g} MiB"
    for site in SITES:
        said = [e.get("detail", "") for e in outcome.handle.events if e.get("type") == "site" and e["site"] == site]
        assert any(f"{site} kept only the first {cut} of the step's output in its log" in d for d in said), said
        log = team_log(redteam, site, run)
        assert log.stat().st_size < LIMITS.log_limit_mb * 2**20 + (1 << 20)  # the limit, then the note, no more
        assert log.read_text().count("the rest of it was not kept") == 1
        assert limit_records(redteam, site, outcome, "log")
    assert outcome.leaked() == []
    still_serves(redteam)


def team_log(team: RedTeam, site: str, run: str) -> Path:
    return team.sites_dir / site / "logs" / f"run-{run}.log"


def test_filling_the_scratch_stops_at_its_size_not_at_the_hosts_disk(redteam) -> None:
    # files under the file-size limit, one after another, in the run's own folder: at most twice the scratch's size
    body = f"""
import os
chunk = b'x' * (64 << 20)
for n in range({2 * LIMITS.scratch_limit_mb // (LIMITS.file_limit_mb // 2)}):
    with open(f'fill-{{n}}', 'wb') as fh:
        for _ in range({LIMITS.file_limit_mb // 2 // 64}):
            fh.write(chunk)
"""
    outcome = redteam.train(hostile(body), "fill-scratch")
    sentence = f"the task process (it filled the room {{site}} gives a run to write: {LIMITS.scratch_limit_mb} MiB)"
    assert_stopped(redteam, outcome, "ScratchLimit", sentence, "scratch")


def test_a_huge_file_stops_at_the_file_size_limit(redteam) -> None:
    body = f"""
chunk = b'x' * (64 << 20)
with open('huge', 'wb') as fh:
    for _ in range({2 * LIMITS.file_limit_mb // 64}):
        fh.write(chunk)
"""
    outcome = redteam.train(hostile(body), "huge-file")
    sentence = f"the task process (a file it wrote reached {{site}}'s limit of {LIMITS.file_limit_mb} MiB a file)"
    assert_stopped(redteam, outcome, "FileSizeLimit", sentence, "file_size")


def test_a_huge_file_with_its_signal_restored_ends_the_task_process_at_the_same_limit(redteam) -> None:
    body = f"""
import signal
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; by default the kernel ends the process at the limit
chunk = b'x' * (64 << 20)
with open('huge', 'wb') as fh:
    for _ in range({2 * LIMITS.file_limit_mb // 64}):
        fh.write(chunk)
"""
    outcome = redteam.train(hostile(body), "huge-file-signal")
    sentence = f"the task process (a file it wrote reached {{site}}'s limit of {LIMITS.file_limit_mb} MiB a file)"
    assert_stopped(redteam, outcome, "FileSizeLimit", sentence, "file_size")


def test_threads_at_one_site_do_not_starve_the_other_sites_runs(redteam) -> None:
    # every site's tasks run as the same task user on this host: in round 1 the first hospital takes every thread
    # its limit allows and holds them; in round 2, while it still holds them, the other hospital starts its own
    first, other = SITES
    body = f"""
import threading
threading.stack_size(1 << 16)
hold = globals().setdefault('_hold', threading.Event())
if data.site == {first!r} and data.round == 1:
    try:
        for _ in range(100000):
            threading.Thread(target=hold.wait, daemon=True).start()
    except RuntimeError:
        pass  # at its limit: the threads stay, waiting
if data.round == 2:
    for _ in range(16):
        threading.Thread(target=hold.wait, daemon=True).start()
"""
    outcome = redteam.train(hostile(body), "threads", rounds=2, min_sites=1)
    assert outcome.handle is not None
    trained = outcome.handle.history.query("phase == 'train' and site != 'global'")
    assert set(trained[trained["round"] == 2].site) == {other}, trained  # its run got its threads
    details = failed_details(outcome)
    processes = f"the task process (it reached {first}'s limit of 1024 processes and threads a run)"
    assert details == {first: f"ProcessLimit in {processes}"}, details
    assert outcome.leaked() == []
    assert limit_records(redteam, first, outcome, "processes")
    still_serves(redteam)


IO_URING = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
ring = libc.syscall(425, 4, params)  # io_uring_setup, on x86_64 and aarch64 alike
if ring == -1 and ctypes.get_errno() == errno.EPERM:
    raise PermissionError('io_uring refused')
"""


def assert_refused(team: RedTeam, outcome: Outcome, source: str, error_type: str, marker: str) -> None:
    """Every site failed the step where the cell raised after the kernel refused it all; audited; still serves."""
    line = 1 + next(i for i, text in enumerate(source.splitlines()) if marker in text)
    assert failed_details(outcome) == {s: f"{error_type} at cell line {line} in train()" for s in SITES}
    assert outcome.leaked() == []
    assert outcome.handle is not None
    for site in SITES:
        records = read_records(team.sites_dir / site)
        outcomes = [r for r in records if r["kind"] == "outcome" and r["run"] == outcome.handle.run_id]
        assert outcomes and outcomes[-1]["outgoing"]["status"] == "error"
    still_serves(team)


def test_an_io_uring_cannot_be_opened(redteam) -> None:
    source = hostile(IO_URING)
    assert_refused(redteam, redteam.train(source, "io-uring"), source, "PermissionError", "io_uring refused")


SOCKETS = """
import socket
opened = []
for family in (socket.AF_VSOCK, socket.AF_PACKET, socket.AF_NETLINK, socket.AF_INET, socket.AF_INET6, 31, 38):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_SEQPACKET):
        try:
            socket.socket(family, kind).close()
            opened.append(family)
        except OSError:
            pass
        try:
            for end in socket.socketpair(family, kind):
                end.close()
            opened.append(family)
        except OSError:
            pass
ours = socket.socketpair()  # its own Unix sockets still work (multiprocessing, data loaders)
if not opened:
    raise ConnectionRefusedError('every other family refused')
"""


def test_vsock_packet_netlink_and_ip_sockets_cannot_be_opened(redteam) -> None:
    source = hostile(SOCKETS)
    outcome = redteam.train(source, "socket-families")
    assert_refused(redteam, outcome, source, "ConnectionRefusedError", "every other family refused")


HOST_VIEWS = """
import os
seen = []
for path in ('/sys/fs/cgroup', '/sys/kernel', '/sys/class', '/sys/firmware', '/sys/fs', '/proc/sys',
             '/proc/pressure', '/proc/cgroups', '/proc/cmdline', '/proc/loadavg', '/proc/uptime', '/proc/modules',
             '/proc/partitions', '/proc/diskstats', '/proc/version', '/proc/kallsyms',
             '/proc/sys/kernel/random/boot_id'):
    try:
        found = os.listdir(path) if os.path.isdir(path) else open(path).read(64)
    except OSError:
        continue
    if found:
        seen.append(path)
if not seen:
    raise FileNotFoundError('no view of the host')
"""


def test_the_hosts_cgroup_tree_and_other_host_views_are_absent(redteam) -> None:
    source = hostile(HOST_VIEWS)
    outcome = redteam.train(source, "host-views")
    assert_refused(redteam, outcome, source, "FileNotFoundError", "no view of the host")


# each holds 3 GiB, past the run's 2 GiB at the red team's sites (kit.MEMORY_LIMIT_MB), in ways a limit per process
# does not count: shared memory, and children that each stay under it
SHARED_MEMORY = """
import mmap
chunk = b'\\x01' * (16 << 20)
held = []
for _ in range(6):  # 6 x 512 MiB of shared anonymous memory, which RLIMIT_DATA does not count: 3 GiB in all
    block = mmap.mmap(-1, 512 << 20)  # MAP_SHARED | MAP_ANONYMOUS: no file, so no file size limit either
    for _ in range(32):
        block.write(chunk)
    held.append(block)
raise ValueError('LEAK3072 held past the limit')
"""

CHILDREN = """
import os, select
go_read, go_write = os.pipe()
ready_read, ready_write = os.pipe()
watched = {}
for _ in range(4):  # 4 x 768 MiB, each under a per-process limit, 3 GiB together: past the run's 2 GiB
    pid = os.fork()
    if pid == 0:
        try:
            held = b'\\x01' * (768 << 20)
            os.write(ready_write, b'1')
            os.read(go_read, 1)  # held until the parent lets go
        finally:
            os._exit(0)
    watched[os.pidfd_open(pid)] = pid
poller = select.poll()
poller.register(ready_read, select.POLLIN)
for fd in watched:
    poller.register(fd, select.POLLIN)  # a pidfd is readable once its child has ended
ready = 0
while ready < 4:
    events = dict(poller.poll())
    if any(fd in watched for fd in events):
        raise MemoryError('a child was stopped at the limit')
    ready += len(os.read(ready_read, 4))
raise ValueError('LEAK3072 held together past the limit')
"""


def assert_held(team: RedTeam, outcome: Outcome, source: str) -> None:
    """Every site stopped the run at its memory: the cgroup killed a process (the agent's sentence) or the cell met
    the limit and raised MemoryError (a line, told as MemoryLimit); nothing leaked; audited; the sites serve."""
    lines = [1 + i for i, text in enumerate(source.splitlines()) if "stopped at the limit" in text]
    details = failed_details(outcome)
    for site in SITES:
        assert details.get(site) in (
            f"MemoryLimit in the task process (its processes together passed {site}'s memory limit for a run)",
            *(f"MemoryLimit at cell line {line} in train()" for line in lines),
        ), details
    assert outcome.leaked() == []
    for site in SITES:
        assert limit_records(team, site, outcome, "memory"), f"{site}'s audit log has no memory limit"
    still_serves(team)


def test_shared_memory_past_the_runs_limit_is_stopped_at_it(redteam) -> None:
    source = hostile(SHARED_MEMORY)
    assert_held(redteam, redteam.train(source, "shared-memory"), source)


def test_children_that_each_stay_under_a_process_limit_are_stopped_together_at_the_runs(redteam) -> None:
    source = hostile(CHILDREN)
    assert_held(redteam, redteam.train(source, "children"), source)


def test_runs_past_the_sites_runs_limit_are_refused_while_the_others_go_on(redteam) -> None:
    # each run holds a task process at every site, which may use the run's memory: a researcher starts as many as
    # a site takes at once, holds them in train(), and starts one more
    client = redteam.client()
    held = [
        client.train(GATED_CELL, dataset="heart-disease", rounds=1, seed=0, name=f"held-{i}") for i in range(RUNS_LIMIT)
    ]

    def holding(run_id: str) -> bool:  # every site's task process of the run has its scratch: it is in train()
        return all(Gate._seen(redteam.sites_dir / site / "scratch" / f"run-{run_id}") for site in SITES)

    assert wait_until(lambda: all(holding(h.run_id) for h in held), 120)
    outcome = redteam.train(hostile("raise ValueError('LEAK1 one run too many')"), "one-more")
    for handle in held:
        Gate(redteam.sites_dir).open(handle.run_id)
    for handle in held:  # the runs it held go on to the end
        handle.wait(180)
        assert handle.status == "completed", handle.reason
    sentence = "RunLimit in the site agent ({site} runs at most {limit} runs at once: not this one now)"
    assert failed_details(outcome) == {s: sentence.format(site=s, limit=RUNS_LIMIT) for s in SITES}
    assert outcome.leaked() == []
    for site in SITES:
        assert limit_records(redteam, site, outcome, "runs"), f"{site}'s audit log has no runs limit"
    still_serves(redteam)


def test_after_these_attacks_every_site_still_trains(redteam) -> None:
    still_trains(redteam)
