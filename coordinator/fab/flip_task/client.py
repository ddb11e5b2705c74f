"""ClientApp component: FLIP's installed site runner."""

from site_agent.flower_client import app

__all__ = ["app"]
