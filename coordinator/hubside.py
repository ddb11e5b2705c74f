"""The hub side's processes, defined once for ``flip up`` (the local federation) and ``flip serve``.

The hub runs four processes: the warm ServerApp starter (``coordinator.serverapp_zygote``), the
SuperLink (Flower's deployment engine: TLS and SuperNode authentication, unless insecure), the
coordinator (``python -m coordinator``) and, with TLS, the fleet front (``coordinator.fleet_front``),
the one address sites reach. :class:`HubSide` says how each is started; the launchers decide how
they are supervised (``flip up`` detaches them, ``flip serve`` keeps them as children).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.blobs import BLOB_HEADROOM
from coordinator.blobs import FOLDER as BLOBS
from coordinator.config import CoordinatorConfig
from coordinator.hublink import ENV_TOKEN, ENV_URL
from coordinator.nginx_front import NginxFront, nginx_binary
from coordinator.serverapp_zygote import ENV_SOCKET as ZYGOTE_SOCKET_ENV
from coordinator.serverapp_zygote import write_launcher

SUPEREXEC_POLL_SECONDS = "0.2"  # Flower's documented FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s)
IN_MEMORY = ":flwr-in-memory:"  # the SuperLink's database for a federation that lives for one session
# FLIP_SUPERLINK_LOG_LEVEL=DEBUG makes the SuperLink log every API call (the benchmarks count them)
ENV_SUPERLINK_LOG_LEVEL = "FLIP_SUPERLINK_LOG_LEVEL"


def bin_path(name: str) -> str:
    """A console script of this environment (Flower's and FLIP's)."""
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path, **extra: str) -> dict[str, str]:
    """The environment for a Flower process FLIP starts: this venv first on PATH (Flower starts
    flower-superexec and flwr-* apps from PATH), its own FLWR_HOME, FLIP's SuperExec poll."""
    bindir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(flwr_home),
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": SUPEREXEC_POLL_SECONDS,
        **extra,
    }


@dataclass(frozen=True)
class ProcessSpec:
    """One process to start: its name (as ``flip status`` lists it), command line and environment."""

    name: str
    command: list[str]
    env: dict[str, str] = field(repr=False)


@dataclass(frozen=True)
class HubSide:
    """How the hub's processes start for one state folder.

    ``root``: where the ServerApp starter's socket, the launcher and Flower's home go; ``config_path``:
    the coordinator's config (``config`` as written there: its ports, tokens and the SuperLink's CA);
    ``pki``: the folder with ``ca.pem`` and the hub's ``superlink.pem``/``.key`` (None: insecure, no
    fleet front); ``listen``/``front_port``: the fleet front's address; ``database``: the SuperLink's.
    """

    root: Path
    config_path: Path
    config: CoordinatorConfig
    pki: Path | None
    listen: str = "127.0.0.1"
    front_port: int = 0
    database: str = IN_MEMORY
    front_kind: str = "python"  # the fleet front: FLIP's own (coordinator.fleet_front) or "nginx" (nginx_front)

    @property
    def superlink(self) -> str:
        return self.config.superlink_control

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    @property
    def fleet(self) -> str:
        """The address sites reach: the fleet front with TLS, else the SuperLink itself."""
        return f"127.0.0.1:{self.front_port}" if self.pki is not None else self.superlink

    def base_env(self) -> dict[str, str]:
        return flower_env(self.root / "flwr")

    def hub_env(self) -> dict[str, str]:
        """What the coordinator and the ServerApp get: the coordinator's address and internal token."""
        return {**self.base_env(), ENV_URL: self.coordinator_url, ENV_TOKEN: self.config.internal_token}

    def _superlink_env(self) -> dict[str, str]:
        # the SuperExec finds FLIP's flwr-serverapp launcher first on PATH: each run's ServerApp is
        # forked from the warm starter instead of importing Flower afresh
        env = self.hub_env()
        launcher_dir = write_launcher(self.root / "bin").parent
        return {
            **env,
            "FLWR_LOG_LEVEL": os.environ.get(ENV_SUPERLINK_LOG_LEVEL, "INFO"),
            "PATH": str(launcher_dir) + os.pathsep + env["PATH"],
            ZYGOTE_SOCKET_ENV: str(self.socket),
        }

    @property
    def max_payload_bytes(self) -> int:
        """The largest payload upload the front lets through: what the coordinator's payload store takes."""
        return self.config.max_model_bytes + BLOB_HEADROOM

    @property
    def socket(self) -> Path:
        return self.root / "serverapp.sock"

    def _tls(self) -> list[str]:
        if self.pki is None:
            return ["--insecure"]
        return [
            "--ssl-certfile",
            str(self.pki / "superlink.pem"),
            "--ssl-keyfile",
            str(self.pki / "superlink.key"),
            "--ssl-ca-certfile",
            str(self.pki / "ca.pem"),
            "--enable-supernode-auth",
        ]

    def coordinator(self) -> ProcessSpec:
        return ProcessSpec(
            "coordinator", [sys.executable, "-m", "coordinator", "--config", str(self.config_path)], self.hub_env()
        )

    def engine(self) -> list[ProcessSpec]:
        """The ServerApp starter and the SuperLink (on the hub's loopback only)."""
        superlink_env = self._superlink_env()
        return [
            ProcessSpec(
                "serverapp-zygote",
                [sys.executable, "-m", "coordinator.serverapp_zygote", "--socket", str(self.socket)],
                superlink_env,
            ),
            ProcessSpec(
                "superlink",
                [
                    bin_path("flower-superlink"),
                    *self._tls(),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    self.superlink.rsplit(":", 1)[1],
                    "--disable-runtime-dependency-installation",
                    "--database",
                    self.database,
                ],
                superlink_env,
            ),
        ]

    def front(self) -> list[ProcessSpec]:
        """The fleet front, with TLS (none for an insecure federation: sites reach the SuperLink)."""
        if self.pki is None:
            return []
        if self.front_kind == "nginx":
            return [self._nginx_front()]
        return [
            ProcessSpec(
                "fleet-front",
                [
                    sys.executable,
                    "-m",
                    "coordinator.fleet_front",
                    "--host",
                    self.listen,
                    "--port",
                    str(self.front_port),
                    "--superlink",
                    f"https://{self.superlink}",
                    "--superlink-ca",
                    str(self.pki / "ca.pem"),
                    "--coordinator",
                    self.coordinator_url,
                    "--certfile",
                    str(self.pki / "superlink.pem"),
                    "--keyfile",
                    str(self.pki / "superlink.key"),
                    "--registry",
                    str(self.config.registry_path),
                    "--max-payload-bytes",
                    str(self.max_payload_bytes),
                ],
                self.base_env(),
            )
        ]

    def _nginx_front(self) -> ProcessSpec:
        assert self.pki is not None
        conf = NginxFront(
            listen=f"{self.listen}:{self.front_port}",
            superlink=self.superlink,
            coordinator=f"127.0.0.1:{self.config.port}",
            certfile=str(self.pki / "superlink.pem"),
            keyfile=str(self.pki / "superlink.key"),
            superlink_ca=str(self.pki / "ca.pem"),
            state=str(self.root / "nginx"),
            payloads=str(self.config.state_dir / BLOBS),
            max_payload=self.max_payload_bytes,
            user="root" if os.geteuid() == 0 else None,
        ).write(self.root / "nginx.conf")
        errors = str(self.root / "nginx" / "nginx-error.log")  # -e: not the system log (another user cannot open it)
        command = [nginx_binary(), "-c", str(conf), "-e", errors, "-g", "daemon off;"]
        return ProcessSpec("fleet-front", command, self.base_env())

    def processes(self, *, coordinator: bool = True) -> list[ProcessSpec]:
        """Every hub process in start order (``coordinator=False``: something else starts it, e.g. JupyterHub)."""
        return [*self.engine(), *([self.coordinator()] if coordinator else []), *self.front()]
