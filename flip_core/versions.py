"""Package versions, for run records (the hub's, the notebook's, each site's), and a hash of the whole installed
package set, so that a record can say that something changed even where the named packages did not."""

from __future__ import annotations

import functools
import hashlib
import platform
from importlib import metadata

# the packages a run record names at every role: what decides how a cell trains and how the hub aggregates
RECORDED_PACKAGES = ("flip", "flwr", "torch", "monai", "numpy", "pandas")


def package_versions(*names: str) -> dict[str, str]:
    """Python's and the named distributions' versions (a distribution not installed is left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


@functools.cache
def environment_hash() -> str:
    """``sha256:`` of the sorted ``name==version`` lines of every installed distribution and Python's version:
    equal in two environments that hold the same packages at the same versions (computed once per process)."""
    lines = {f"{(d.metadata['Name'] or '').lower()}=={d.version}" for d in metadata.distributions()}
    text = "\n".join([f"python=={platform.python_version()}", *sorted(lines)])
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def environment() -> dict[str, object]:
    """What a run record keeps of one role's environment: the recorded packages' versions and the set's hash."""
    return {"packages": package_versions(*RECORDED_PACKAGES), "hash": environment_hash()}


__all__ = ["RECORDED_PACKAGES", "environment", "environment_hash", "package_versions"]
