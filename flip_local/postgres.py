"""A PostgreSQL server of the local federation's own: Debian's PostgreSQL, started in a folder, on a free port.

``initdb`` and ``pg_ctl`` run as an unprivileged user, never as root (PostgreSQL refuses root): run by root (CI,
a container), each command runs in a user namespace of its own where it is uid 1000, mapped to the caller outside, so
the server owns the folder it is given wherever that folder is. The server listens on 127.0.0.1 and a free port
(never the system's 5432) and on a socket in the folder, where the folder's owner connects without a password (the
folder is 0700: no one else reaches the socket); every other login is by password (scram-sha-256).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from flip_core.util import free_port
from flip_local.errors import SitesError

SUPERUSER = "flip_admin"
START_SECONDS = 60


@dataclass(frozen=True)
class Postgres:
    """A running server: its folder (data, socket, log), its port on 127.0.0.1."""

    folder: Path
    port: int

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def socket_dir(self) -> Path:
        return self.folder / "run"

    def admin(self, database: str = "postgres") -> str:
        """The connection string of the superuser, over the folder's socket."""
        return f"host={self.socket_dir} port={self.port} dbname={database} user={SUPERUSER}"


def bindir() -> Path:
    """Where Debian's PostgreSQL keeps ``initdb`` and ``pg_ctl`` (its newest version), or on the PATH."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise SitesError(
            "PostgreSQL is not installed (initdb and pg_ctl): on Debian `apt-get install postgresql` "
            "(make test installs it when run as root)"
        )
    return versions[-1].parent


def prepare(folder: Path, port: int | None = None) -> Postgres:
    """The server of ``folder`` (made and initialised the first time) on ``port`` (a free one), not started."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    server = Postgres(folder, port or free_port())  # below the kernel's range for outgoing ports
    server.socket_dir.mkdir(exist_ok=True)
    if not (server.data / "PG_VERSION").exists():
        _initdb(server)
    return server


def foreground(server: Postgres) -> list[str]:
    """The command that runs ``server`` in the foreground (a process of the local federation, stopped with it)."""
    return _command(
        "postgres",
        "-D", str(server.data), "-p", str(server.port), "-k", str(server.socket_dir),
        "-c", "listen_addresses=127.0.0.1",
    )  # fmt: skip


def answers(server: Postgres) -> bool:
    """The server takes its superuser's connection now."""
    import psycopg

    try:
        with psycopg.connect(server.admin(), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False


def start(folder: Path, port: int | None = None) -> Postgres:
    """Start the server in ``folder`` (made and initialised the first time) on ``port`` (a free one)."""
    server = prepare(folder, port)
    _run(
        server,
        "pg_ctl",
        "-D", str(server.data), "-l", str(folder / "postgres.log"), "-w", "-t", str(START_SECONDS),
        "-o", f"-p {server.port} -k {server.socket_dir} -c listen_addresses=127.0.0.1",
        "start",
    )  # fmt: skip
    return server


def stop(server: Postgres) -> None:
    """Stop the server (fast: open sessions are ended); nothing when it is not running."""
    if (server.data / "postmaster.pid").exists():
        _run(server, "pg_ctl", "-D", str(server.data), "-m", "fast", "-w", "stop", check=False)


def _initdb(server: Postgres) -> None:
    password = server.folder / "superuser.pass"
    password.write_text(secrets.token_urlsafe(24) + "\n")
    password.chmod(0o600)
    _run(
        server,
        "initdb",
        "-D", str(server.data), "-U", SUPERUSER, "--pwfile", str(password), "-E", "UTF8", "--locale", "C",
        "--auth-local", "trust", "--auth-host", "scram-sha-256",
    )  # fmt: skip


def _command(tool: str, *args: str) -> list[str]:
    command = [str(bindir() / tool), *args]
    if os.geteuid() == 0:  # PostgreSQL refuses root: uid 1000 in a user namespace, the caller outside
        command = ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--", *command]
    return command


def _run(server: Postgres, tool: str, *args: str, check: bool = True) -> None:
    done = subprocess.run(
        _command(tool, *args), capture_output=True, text=True, timeout=START_SECONDS + 30, check=False
    )
    if check and done.returncode != 0:
        log = server.folder / "postgres.log"
        tail = log.read_text()[-1500:] if log.exists() else ""
        raise SitesError(f"PostgreSQL's {tool} failed in {server.folder}: {(done.stderr or done.stdout)[-1500:]}{tail}")


__all__ = ["SUPERUSER", "Postgres", "answers", "bindir", "foreground", "prepare", "start", "stop"]
