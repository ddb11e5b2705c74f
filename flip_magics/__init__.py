"""FLIP's notebook side: ``%load_ext flip_magics``.

The magics (``%flip_connect``, ``%flip_sites``, ``%flip_query``, ``%flip_cohort``, ``%%flip_train``,
``%flip_runs``, ``%flip_attach``, ``%flip_stop``; the airlock's ``%flip_request``, ``%flip_requests``,
``%flip_released``) are thin shells over :class:`flip_magics.client.FlipClient`,
which works without IPython too. The names below are the public surface a notebook or script
imports (``from flip_magics import FlipClient, RunFailed, data_dir``); they load on first use,
so ``%load_ext`` stays quick.
"""

from __future__ import annotations

import importlib
from typing import Any

from flip_core import __version__

_PUBLIC = {
    "FlipClient": "flip_magics.client",
    "RunHandle": "flip_magics.run_handle",
    "FlipError": "flip_core.errors",
    "NotConnected": "flip_core.errors",
    "Rejected": "flip_core.errors",
    "RunFailed": "flip_core.errors",
    "TaskInvalid": "flip_core.errors",
    "data_dir": "flip_core.paths",
}

__all__ = ["__version__", "load_ipython_extension", *sorted(_PUBLIC)]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'flip_magics' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def _figure_png(figure: Any) -> bytes:
    from flip_magics.figures import png

    return png(figure)


def load_ipython_extension(ipython: Any) -> None:
    from flip_magics.airlock_magics import AirlockMagics
    from flip_magics.magics import FlipMagics

    ipython.register_magics(FlipMagics)
    ipython.register_magics(AirlockMagics)
    # a query's figure (matplotlib's Figure, never pyplot) shows inline and stays in papermill's output,
    # whatever matplotlib backend the kernel has; matplotlib itself loads only when a figure is shown
    formatter = ipython.display_formatter.formatters["image/png"]
    formatter.for_type_by_name("matplotlib.figure", "Figure", _figure_png)
