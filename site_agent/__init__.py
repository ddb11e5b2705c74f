"""FLIP site agent: the hospital side (data catalog, task runner, Flower SuperNode, CLI)."""

__version__ = "0.1.0"
