"""FLIP site agent: the hospital side (data catalog, policy, task runner and its isolation, output
guard, audit log, fleet client, CLI)."""

from flip_core import __version__

__all__ = ["__version__"]
