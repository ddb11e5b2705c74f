"""The errors that more than one part of the ``flip`` command raises: the local sites that could not be prepared,
whether the heart-disease hospitals (:mod:`flip_local.sites`) or the imaging demo's (:mod:`flip_local.imaging_demo`).
"""

from __future__ import annotations

from flip_core.errors import FlipError


class SitesError(FlipError):
    """The local sites could not be prepared (their data is missing or cannot be read)."""


__all__ = ["SitesError"]
