"""What every FLIP role shares: the notebook (``flip_magics``), the hub service (``coordinator``),
the site agent (``site_agent``) and the local tools (``flip_local``).

It imports none of them (``pyproject.toml``'s import contracts say so). Its modules:

- ``errors``: :class:`FlipError` and its subclasses, each a sentence with fields that pickle;
- ``status``: the statuses and kinds that cross a process boundary, as enums;
- ``cell``: the rules of a ``%%flip_train`` cell (its functions, normalised source, hash, failing line);
- ``codec``: the one array codec (``.npz``, no pickle) and the model check;
- ``protocol``: a task step and its result, and their bytes between hub, site and task process;
- ``wire``: how those bytes ride inside a Flower message (the one module here that imports Flower);
- ``api``: the typed bodies of the coordinator's HTTP routes;
- ``certs``: the consortium's PKI (CA, hub certificate, site keys);
- ``paths``: where FLIP keeps things on a machine (the connection file, the public data);
- ``versions``, ``util``: package versions for run records; small waiting and port helpers.
"""

from __future__ import annotations

__version__ = "0.1.0"
VERSION = __version__

__all__ = ["VERSION", "__version__"]
