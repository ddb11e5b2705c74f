"""FLIP's notebook side: ``%load_ext flip_magics``.

The magics (``%flip_connect``, ``%flip_sites``, ``%%flip_train``, ``%flip_runs``,
``%flip_attach``, ``%flip_stop``) are thin shells over :class:`flip_magics.client.FlipClient`,
which works without IPython too.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_ipython_extension(ipython: Any) -> None:
    from flip_magics.magics import FlipMagics

    ipython.register_magics(FlipMagics)
