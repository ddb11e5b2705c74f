"""The site agent's parts as its unit tests see them: an image loader that reads no file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def fake_images(arrays: dict[str, np.ndarray]) -> tuple[list[Path], Callable[[Path], np.ndarray]]:
    """Stands in for an imaging dataset's files and ``site_agent.data.images.load_array``: each name's array, as
    the loader would decode it, and no file read."""
    return [Path(name) for name in arrays], lambda path: arrays[str(path)]
