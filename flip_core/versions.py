"""Package versions, for run records (the hub's, the notebook's, each site's)."""

from __future__ import annotations

import platform
from importlib import metadata


def package_versions(*names: str) -> dict[str, str]:
    """Python's and the named distributions' versions (a distribution not installed is left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


__all__ = ["package_versions"]
