"""``flip-site start``: run a site's Flower SuperNode and keep the coordinator informed.

The agent starts ``flower-supernode`` (which runs FLIP's ClientApp for every message),
learns its node id from the SuperNode's log, announces the site's datasets (metadata only)
to the coordinator and holds a presence stream open, so that the hub sees at once when the
site goes away. A SuperNode that exits is restarted; the agent's own death takes the
SuperNode with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import logging
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import requests

from coordinator.local import flower_env, free_port
from site_agent import __version__
from site_agent.catalog import SiteConfig
from site_agent.tasks import TaskService, die_with_parent

log = logging.getLogger(__name__)

NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")
RECONNECT_SECONDS = 0.5
RESTART_SECONDS = 1.0


def supernode_command(site: SiteConfig, superlink: str, runtime_port: int) -> list[str]:
    binary = Path(sys.executable).parent / "flower-supernode"
    site_dir = str(site.root).replace("\\", "\\\\").replace('"', '\\"')
    return [
        str(binary), "--insecure", "--superlink", superlink,
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--node-config", f'flip-site-dir="{site_dir}"',
    ]


class SiteAgent:
    def __init__(self, site: SiteConfig, superlink: str, coordinator: str, token: str) -> None:
        self.site = site
        self.superlink = superlink
        self.coordinator = coordinator.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        self.node_id: int | None = None
        self.stopping = threading.Event()
        self.node_ready = threading.Event()
        self.process: subprocess.Popen[str] | None = None

    # -- coordinator ----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"version": __version__, "datasets": [d.summary() for d in self.site.datasets.values()]}

    def announce(self, state: str = "online") -> None:
        body = {"site": self.site.name, "node_id": self.node_id, "info": self.info(), "state": state}
        response = self.session.post(f"{self.coordinator}/site/announce", json=body, timeout=10)
        if response.status_code == 401:
            raise SystemExit(f"the coordinator at {self.coordinator} refused this site's token")
        response.raise_for_status()

    def _presence(self) -> None:
        """Hold the presence stream; reconnect (and announce again) whenever it drops."""
        while not self.stopping.is_set():
            try:
                self.node_ready.wait()
                self.announce()
                url = f"{self.coordinator}/site/presence/{self.site.name}"
                with self.session.get(url, stream=True, timeout=(5, 5)) as response:
                    response.raise_for_status()
                    for _ in response.iter_lines():
                        if self.stopping.is_set():
                            return
            except (requests.RequestException, OSError) as exc:
                log.info("presence stream to the coordinator dropped (%s); reconnecting", type(exc).__name__)
            self.stopping.wait(RECONNECT_SECONDS)

    # -- the SuperNode --------------------------------------------------------------
    def _start_supernode(self) -> subprocess.Popen[str]:
        env = flower_env(self.site.root / "flwr")
        command = supernode_command(self.site, self.superlink, free_port())
        log.info("starting %s", " ".join(command))
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            preexec_fn=die_with_parent,
        )

    def _pump(self, process: subprocess.Popen[str]) -> None:
        """Copy the SuperNode's log to the site log; pick up its node id."""
        assert process.stdout is not None
        with open(self.site.root / "logs" / "supernode.log", "a") as sink:
            for line in process.stdout:
                sink.write(line)
                sink.flush()
                match = NODE_ID_LINE.search(line)
                if match:
                    self.node_id = int(match.group(1))
                    log.info("SuperNode registered with node id %s", self.node_id)
                    self.node_ready.set()

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.tasks = TaskService(self.site.name, self.site.root)
        threading.Thread(target=self.tasks.serve_forever, name="tasks", daemon=True).start()
        threading.Thread(target=self._presence, name="presence", daemon=True).start()
        while not self.stopping.is_set():
            self.process = self._start_supernode()
            pump = threading.Thread(target=self._pump, args=(self.process,), daemon=True)
            pump.start()
            while self.process.poll() is None and not self.stopping.is_set():
                self.stopping.wait(0.2)
            if self.stopping.is_set():
                break
            tail = (self.site.root / "logs" / "supernode.log").read_text(errors="replace").splitlines()[-3:]
            log.warning("the SuperNode exited with code %s; restarting. Its last words:\n%s",
                        self.process.returncode, "\n".join(tail))
            self.node_ready.clear()
            self.node_id = None
            self._safe_announce("offline")
            self.stopping.wait(RESTART_SECONDS)
        self._shutdown()
        return 0

    def _safe_announce(self, state: str) -> None:
        try:
            self.announce(state)
        except (requests.RequestException, SystemExit) as exc:
            log.info("could not tell the coordinator this site is %s: %s", state, exc)

    def _shutdown(self) -> None:
        self.tasks.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._safe_announce("offline")
        log.info("site agent %s stopped", self.site.name)

