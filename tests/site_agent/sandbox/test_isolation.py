"""What a task process gives up (``site_agent.sandbox.isolation``), tried in real child processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from site_agent.sandbox.isolation import probe

CHILD = "from site_agent.sandbox.isolation import drop_network, limit_memory\n"


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD + code], capture_output=True, text=True, timeout=60)


def test_this_host_can_isolate_task_processes() -> None:
    assert probe() == ""


def test_a_process_that_dropped_the_network_cannot_reach_a_listening_port() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        reach = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)\nprint('connected')\n"
        assert "connected" in run_child(reach).stdout  # the same code reaches it without isolation
        isolated = run_child("drop_network()\n" + reach)
    assert isolated.returncode != 0 and "connected" not in isolated.stdout
    assert "OSError" in isolated.stderr or "unreachable" in isolated.stderr.lower()


def test_memory_beyond_the_limit_is_refused_and_cannot_be_raised_again() -> None:
    code = (
        "import resource\nlimit_memory(256)\n"
        "try:\n    hoard = bytearray(512 * 2**20)\nexcept MemoryError:\n    print('refused')\n"
        "try:\n    resource.setrlimit(resource.RLIMIT_DATA, (2**40, 2**40))\n"
        "except (ValueError, OSError):\n    print('kept')\n"
    )
    done = run_child(code)
    assert done.stdout.split()[0] == "refused", done.stderr
    if os.geteuid() != 0:  # only a process with CAP_SYS_RESOURCE (root, usually) may raise a hard limit
        assert done.stdout.split()[1:] == ["kept"], done.stderr


def test_a_confined_process_reads_only_what_it_was_given(tmp_path) -> None:
    allowed, secret, scratch = tmp_path / "dataset.csv", tmp_path / "tokens.json", tmp_path / "scratch"
    allowed.write_text("age\n63\n")
    secret.write_text('{"token": "s3cret"}')
    scratch.mkdir()
    code = (
        f"from pathlib import Path\nfrom site_agent.sandbox.isolation import confine_files, python_paths\n"
        f"confine_files([*python_paths(), Path({str(allowed)!r})], [Path({str(scratch)!r})])\n"
        f"print(Path({str(allowed)!r}).read_text().split()[1])\n"
        f"(Path({str(scratch)!r}) / 'note').write_text('ok')\n"
        f"try:\n    Path({str(secret)!r}).read_text()\nexcept PermissionError:\n    print('refused')\n"
        f"try:\n    Path({str(allowed)!r}).write_text('x')\nexcept PermissionError:\n    print('read-only')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["63", "refused", "read-only"], done.stderr
    assert (scratch / "note").read_text() == "ok"


def test_a_second_layer_narrows_writing_to_one_runs_scratch(tmp_path) -> None:
    root = tmp_path / "scratch"
    mine, theirs = root / "run-a", root / "run-b"
    mine.mkdir(parents=True)
    theirs.mkdir()
    (theirs / "notes.txt").write_text("another run's file")
    code = (
        "from pathlib import Path\nfrom site_agent.sandbox.isolation import confine_files, python_paths\n"
        f"confine_files(python_paths(), [Path({str(root)!r})])\n"  # a spare: the site's scratch folder
        f"confine_files(python_paths(), [Path({str(mine)!r})])\n"  # adopted by run a
        f"(Path({str(mine)!r}) / 'own').write_text('ok')\nprint('wrote')\n"
        f"for attempt in (lambda: (Path({str(theirs)!r}) / 'notes.txt').read_text(),\n"
        f"                lambda: (Path({str(theirs)!r}) / 'x').write_text('x'),\n"
        f"                lambda: (Path({str(root)!r}) / 'x').write_text('x')):\n"
        "    try:\n        attempt()\n    except PermissionError:\n        print('refused')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["wrote", "refused", "refused", "refused"], done.stderr
    assert not (theirs / "x").exists() and not (root / "x").exists()


def test_a_confined_process_signals_no_process_outside_its_domain() -> None:
    from site_agent.sandbox.isolation import landlock_abi

    if landlock_abi() < 6:
        raise AssertionError(f"this kernel's Landlock ABI is {landlock_abi()}: signal scoping needs 6")
    code = (
        "import os\nfrom site_agent.sandbox.isolation import confine_files, python_paths\n"
        "confine_files(python_paths(), [])\n"
        "try:\n    os.kill(os.getppid(), 0)\nexcept PermissionError:\n    print('refused')\n"
        "else:\n    print('reached')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["refused"], done.stderr


def test_a_confined_process_reaches_no_abstract_unix_socket_of_the_host() -> None:
    name = f"\0flip-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(name)
        server.listen(1)
        code = (
            "import socket\nfrom site_agent.sandbox.isolation import confine_files, python_paths\n"
            f"name = {name!r}\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
            "confine_files(python_paths(), [])\n"
            "try:\n    s.connect(name)\nexcept PermissionError:\n    print('refused')\nelse:\n    print('reached')\n"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["refused"], done.stderr


def test_the_folder_a_process_starts_in_is_not_part_of_what_it_may_read(tmp_path) -> None:
    code = "from site_agent.sandbox.isolation import python_paths\nprint('\\n'.join(map(str, python_paths())))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    readable = done.stdout.split()
    assert str(tmp_path) not in readable and readable, done.stderr
