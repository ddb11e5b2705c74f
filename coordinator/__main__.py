"""``python -m coordinator --config FILE``: run the coordinator service."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator", description="Run the FLIP coordinator.")
    parser.add_argument("--config", required=True, type=Path, help="coordinator.json written by `flip up`")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from coordinator.app import Notifier, build_app
    from coordinator.config import CoordinatorConfig
    from coordinator.doors import COORDINATOR
    from coordinator.flower_control import FlowerControl
    from coordinator.identity import HeadlessTokens, HubIdentity
    from coordinator.service import RunManager
    from coordinator.store import Store

    config = CoordinatorConfig.load(args.config)
    notifier = Notifier()
    control = FlowerControl(config.superlink_control, Path(config.superlink_ca) if config.superlink_ca else None)
    manager = RunManager(Store(config.state_dir), control, notifier.notify)
    identity = HubIdentity.from_env()  # a JupyterHub service: researchers come with their hub tokens
    if identity is not None:
        logging.getLogger("coordinator").info("researchers are identified by the hub at %s", identity.api_url)
    app = build_app(
        config,
        manager,
        notifier,
        identity,
        os.environ.get("JUPYTERHUB_SERVICE_PREFIX", ""),
        HeadlessTokens(args.config).grants,
    )
    # notebooks' event streams and sites' presence streams never end by themselves: on SIGTERM, 2 s for them;
    # every connection keeps the coordinator's limits (coordinator.doors: head and body timeouts, connections)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        timeout_graceful_shutdown=2,
        **COORDINATOR.uvicorn_options(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
