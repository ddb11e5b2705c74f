"""Cell-key perturbation of released counts (the method of the UK's and Australia's census tables).

Every row has a secret key (``site_agent.queries.ledger.row_keys``: keyed by the site's own secret, a function of
the row's content); a set of rows has a cell key, a keyed hash of its rows' keys (:func:`cell_key`). A count that
leaves is the true count moved by a whole number between ``-noise`` and ``noise`` that is a fixed function of the
cell key (:func:`perturbed`), never below the threshold (a released count is never a small one):

- the same rows always get the same count, in any query, project or session, so asking again tells nothing new;
- two sets that differ by a few rows have independent moves, so the difference of their counts is that few rows
  plus a noise of up to ``2 * noise`` either way: no difference of two released counts is known exactly, nor a
  sum of several;
- the move is uniform over ``-noise .. noise`` (mean 0, variance ``noise * (noise + 1) / 3``), so a pooled count
  of four sites is off by at most ``4 * noise`` and usually by far less.

Magnitudes: a count moved by its cell key is no secret where an exact mean gives it back (a mean of whole numbers
times the right count is a whole number, and only one count within ``noise`` of the released one says so; the same
of ``n (n - 1)`` times a variance). So where counts move, a column's mean and std move too, each by at most its
``std / n`` (a part of what one patient's value moves them by), a fixed function of the values' cell key
(:func:`jitter`), and its quantiles are values of the column (no interpolation between two of them, whose weights
would tell ``n``).

It does not stop a researcher who asks many *different* sets that each hold the same few rows and averages the
differences: that is the ledger's work (``site_agent.queries.ledger``: no released set within the threshold of
another) and, where a site wants a bound on everything together, a privacy budget's.

Pure: hashlib, no I/O.
"""

from __future__ import annotations

import hashlib

PERSON = b"flip-cellkey"


def cell_key(digest: str, key: bytes, what: str = "") -> int:
    """The 64-bit cell key of the set whose keyed digest is ``digest`` (``ledger.RowSet.digest``), under the site's
    ``key`` (a domain of its own: the cell key says nothing of the digest, nor the digest of it); ``what``: one of
    the set's several figures (its count: ``""``; a column's mean: ``"mean"``), each moved on its own."""
    hashed = hashlib.blake2b(f"{digest}|{what}".encode(), key=key, digest_size=8, person=PERSON)
    return int.from_bytes(hashed.digest(), "little")


def move(key: int, noise: int) -> int:
    """The move of a count whose cell key is ``key``: uniform over ``-noise .. noise``."""
    if noise <= 0:
        return 0
    return (key * (2 * noise + 1) >> 64) - noise


def perturbed(count: int, key: int, noise: int, threshold: int) -> int:
    """The count that leaves for ``count`` rows (at least ``threshold`` of them: smaller counts never leave) whose
    cell key is ``key``: moved by at most ``noise``, and never below ``threshold``."""
    if noise <= 0:
        return int(count)
    return max(int(count) + move(key, noise), int(threshold), 0)


def jitter(key: int) -> float:
    """A fraction in [-1, 1), the same for the same cell key."""
    return key / 2.0**63 - 1.0


__all__ = ["cell_key", "jitter", "move", "perturbed"]
