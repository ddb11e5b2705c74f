"""A warm starter for Flower's per-run ServerApp process (``flwr-serverapp``).

For every run, the SuperLink's SuperExec starts ``flwr-serverapp --token ...``: a fresh Python
that spends ~3 s of a 2-core machine importing Flower before FLIP's round loop can send its
first message. This process has imported all of that once. ``flip up`` puts a tiny
``flwr-serverapp`` launcher first on the SuperLink's PATH (``write_launcher``); the launcher
hands its arguments and standard streams to this process over a local socket, which forks a
child that runs Flower's own ``flwr_serverapp()`` entry point with them. The child is exactly
the process Flower would have started, minus the imports; the launcher lives as long as the
child, passes signals on, and exits with its status, so the SuperExec sees no difference.
When this process is not running, the launcher simply executes the real ``flwr-serverapp``.

It is single-threaded on purpose (a fork copies only the calling thread): one ``select`` loop
accepts launches and reaps children. ``tests/coordinator/test_serverapp_zygote.py`` checks
the Flower entry point it relies on.
"""

from __future__ import annotations

import argparse
import array
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_SOCKET = "FLIP_SERVERAPP_ZYGOTE"
LAUNCHER_NAME = "flwr-serverapp"
MAX_REQUEST_BYTES = 1 << 20

# The launcher: stdlib only, started with -IS (isolated, no site) so that it costs a bare interpreter (~20 ms).
LAUNCHER = r'''#!{python} -IS
"""flwr-serverapp, started through FLIP's warm starter when it runs (coordinator/serverapp_zygote.py)."""
import array, json, os, signal, socket, struct, sys

REAL = {real!r}
path = os.environ.get("{env}", "")
try:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
except OSError:
    os.execv(REAL, [REAL] + sys.argv[1:])
body = json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}).encode()
conn.sendmsg([struct.pack("<I", len(body)) + body],
             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [0, 1, 2]))])
reader = conn.makefile("rb")
header = reader.read(4)
if len(header) < 4:
    os.execv(REAL, [REAL] + sys.argv[1:])
child = struct.unpack("<i", header)[0]
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, lambda number, _frame: os.kill(child, number))
status = reader.read(4)
sys.exit(struct.unpack("<i", status)[0] if len(status) == 4 else 1)
'''


def write_launcher(folder: Path) -> Path:
    """Write the ``flwr-serverapp`` launcher into ``folder`` (to be put first on the SuperLink's PATH)."""
    folder.mkdir(parents=True, exist_ok=True)
    real = Path(sys.executable).parent / LAUNCHER_NAME
    path = folder / LAUNCHER_NAME
    path.write_text(LAUNCHER.format(python=sys.executable, real=str(real), env=ENV_SOCKET))
    path.chmod(0o755)
    return path


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]] | None:
    """One launch request: the launcher's arguments and environment, and its three standard streams."""
    fds = array.array("i")
    data, ancillary, _flags, _addr = conn.recvmsg(MAX_REQUEST_BYTES, socket.CMSG_LEN(3 * fds.itemsize))
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if len(data) < 4 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    (size,) = struct.unpack_from("<I", data)
    while len(data) < 4 + size:
        more = conn.recv(4 + size - len(data))
        if not more:
            return None
        data += more
    return dict(json.loads(data[4 : 4 + size])), list(fds)


def _child(request: dict[str, Any], fds: list[int], listener: socket.socket, conns: list[socket.socket]) -> None:
    """In the forked child: become the launcher's ``flwr-serverapp ARGV``, with its environment and
    streams. Never returns."""
    code = 1
    try:
        listener.close()
        for conn in conns:
            conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own streams, for its lifetime
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update({str(k): str(v) for k, v in dict(request["env"]).items()})
        sys.argv = [LAUNCHER_NAME, *[str(a) for a in request["argv"]]]
        from flwr.superlink.cli import flwr_serverapp

        flwr_serverapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report like an uncaught exception would, then exit
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: Path) -> None:
    """Accept launches on the socket at ``path`` until terminated."""
    from flwr.superlink.cli import flwr_serverapp  # noqa: F401 - the imports this process exists to hold

    import coordinator.flower_server  # noqa: F401 - FLIP's round loop, which the run's app imports

    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("ready at %s", path)
    while not stopping:
        for _key, _mask in selector.select(timeout=0.2):
            conn, _ = listener.accept()
            try:
                request = _receive(conn)
            except OSError:
                request = None
            if request is None:
                conn.close()
                continue
            launch, fds = request
            pid = os.fork()
            if pid == 0:
                _child(launch, fds, listener, [conn, *children.values()])
            for fd in fds:
                os.close(fd)
            conn.sendall(struct.pack("<i", pid))
            children[pid] = conn
            log.info("started flwr-serverapp as pid %s", pid)
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            child_conn = children.pop(pid, None)
            if child_conn is not None:
                code = os.waitstatus_to_exitcode(status)
                try:
                    child_conn.sendall(struct.pack("<i", code if code >= 0 else 128 - code))
                except OSError:
                    pass
                child_conn.close()
    listener.close()
    path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.serverapp_zygote", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serverapp-zygote %(levelname)s %(message)s")
    serve(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
