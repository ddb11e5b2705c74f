"""What every FLIP role shares: the notebook (``flip_magics``), the hub service (``coordinator``),
the site agent (``site_agent``) and the local tools (``flip_local``).

It imports none of them (``pyproject.toml``'s import contracts say so). What each of its modules holds is
written once, in the project's map of its packages: ARCHITECTURE.md, "Inside ``flip_core``".
"""

from __future__ import annotations

__version__ = "0.1.0"
VERSION = __version__

__all__ = ["VERSION", "__version__"]
