"""ServerApp component: FLIP's installed server loop."""

from coordinator.flower_server import app

__all__ = ["app"]
