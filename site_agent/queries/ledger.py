"""A site's ledger of every set of rows whose count it has released, against differencing.

Two sets of rows that differ by one patient (``age > 50`` and ``age > 50 and not (...)``) each pass a threshold
on their own, yet the difference of their counts is that patient. The same holds of any two *released* sets, not
only of two queries' filters: a cell of a ``count by`` table and a filtered count of the same rows less one; two
histogram bins whose edges differ by a unit; a cohort and a complement asked for on its own. And it holds of
three: a set that is the union of two released ones but for a few rows, or one less another. So the site enters
in its ledger every set of rows whose count it released (each cell of a count table, histogram or missing table,
a total, a column's values in ``stats``, a frozen cohort) and, before it releases another, checks that the new set
is at least the threshold's number of rows from every entered set, from the whole table (its size is announced),
and from every sum or difference of two of them. A set that fails is withheld (a cell, with whatever else its lines
then need) or refused (a query's cohort).

Where a researcher could pool answers, the check spans them: the entries of the query's project and those of the
same researcher in any other project, on the same dataset.

An entry is not the rows: it is a count sketch, the number of the set's rows in each of ``BUCKETS`` buckets of a
keyed hash of each row's *content* (the key is the site's own and never leaves), and a keyed digest of the set.
Content, not position: a file registered again with rows added, removed or reordered keeps every other row's key,
so what was released before still counts. The L1 distance between two sketches (or between one and the sum or
difference of two) never exceeds the number of rows by which the sets differ: a difference that is truly small
is always caught; a large one reads as small only when its rows cancel in the same buckets, which refuses a
harmless answer, never allows a harmful one. Sums and differences are looked for among the entries whose sizes
could make them, first over sketches folded to ``FOLDED`` buckets (folding only merges buckets, so it keeps the
bound), then over the full sketches. Identical rows share a key; a set is a multiset of keys.

Nothing here talks to the network.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from site_agent.queries.perturbation import cell_key, jitter, perturbed

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("flip.site.ledger")

BUCKETS = 4096
PEEL_SUPERSETS = 20  # released sets holding a new one that are peeled, the smallest first
FOLDED = 64  # buckets of the coarse sketches that pick the candidate pairs (BUCKETS is a multiple of it)
LEDGER_DIR = "queries"
LEDGER_FILE = "released.jsonl"  # (``ledger.jsonl``, a ledger of row positions before this one, is not read)
KEY_FILE = "ledger.key"
WHOLE_TABLE = "the whole table (its size is announced)"


@dataclass(frozen=True)
class RowSet:
    """A released (or to be released) set of rows: its count sketch, keyed digest, size and what it was."""

    sketch: np.ndarray  # int64[BUCKETS]
    digest: str
    size: int
    text: str = ""
    mass: int = 0  # the sum of its rows' keys, modulo 2**64: sets that add up exactly have masses that do
    tag: str = ""  # "": its count left; "values of COLUMN": magnitudes of that column over it left (and its count)
    folded: np.ndarray = field(init=False, repr=False, compare=False)  # int64[FOLDED]: the sketch, coarser

    def __post_init__(self) -> None:
        object.__setattr__(self, "folded", self.sketch.reshape(FOLDED, -1).sum(axis=1))


@dataclass(frozen=True)
class Scope:
    """Whose released sets a new one is checked against: the project's and its researcher's, on the dataset."""

    project: str
    researcher: str
    dataset: str


def site_key(site_dir: Path) -> bytes:
    """The site's own secret for keyed hashes of rows (made once, 0600; it never leaves the site)."""
    folder = Path(site_dir) / LEDGER_DIR
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / KEY_FILE
    if not path.exists():
        tmp = folder / f"{KEY_FILE}.{os.getpid()}.{threading.get_ident()}"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # whole or not at all; a key made a moment ago elsewhere wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def row_keys(table: pd.DataFrame, key: bytes) -> np.ndarray:
    """Each row's key (uint64): a hash of its values (pandas' own, per row), mixed with the site's ``key`` (a keyed
    bijection of 64-bit words: pandas keys only text columns' hashes), the same for the same values in any file, at
    any position."""
    import pandas as pd

    words = np.frombuffer(hashlib.blake2b(key, digest_size=32, person=b"flip-rows").digest(), dtype="<u8")
    with np.errstate(over="ignore"):
        x = np.asarray(pd.util.hash_pandas_object(table, index=False), dtype=np.uint64) ^ words[0]
        x = x * (words[1] | np.uint64(1))
        x ^= x >> np.uint64(29)
        x = x * (words[2] | np.uint64(1))
        x ^= x >> np.uint64(32)
        return np.asarray(x ^ words[3], dtype=np.uint64)


def row_set(keys: np.ndarray, rows: np.ndarray, key: bytes, text: str = "", tag: str = "") -> RowSet:
    """The entry of the rows at positions ``rows`` of a table whose row keys are ``keys``."""
    chosen = np.sort(np.asarray(keys, dtype=np.uint64)[np.asarray(rows, dtype=np.intp)])
    sketch = np.bincount((chosen % np.uint64(BUCKETS)).astype(np.intp), minlength=BUCKETS).astype(np.int64)
    digest = hashlib.blake2b(chosen.tobytes(), key=key, digest_size=16).hexdigest()
    mass = int(chosen.sum(dtype=np.uint64)) if chosen.size else 0
    return RowSet(sketch, digest, int(chosen.size), text, mass, tag)


class Check:
    """Whether new sets may be released beside ``answered`` (the sets released before, in scope) and ``extra`` (sets
    released with them: the other cells of the same table, which may stand in a sum or difference with an answered
    set but are not compared alone, their own table's lines being checked by ``site_agent.disclosure.suppression``).
    """

    def __init__(self, answered: Sequence[RowSet], threshold: int, extra: Sequence[RowSet] = ()) -> None:
        self.threshold = threshold
        self.pool = [*answered, *extra]
        self.answered = len(answered)
        self.sizes = np.array([p.size for p in self.pool], dtype=np.int64)
        self.order = np.argsort(self.sizes, kind="stable")
        self.ordered = self.sizes[self.order]
        self.folded = np.stack([p.folded for p in self.pool]) if self.pool else np.zeros((0, FOLDED), np.int64)
        self.digests = np.array([p.digest for p in self.pool])

    def why(self, new: RowSet) -> str | None:
        """Why ``new`` may not be released: the released set (or sum or difference of two) it differs from by fewer
        than the threshold's number of rows, in words; None when there is none. The same set again is no
        difference: its answer is the same answer."""
        if self.threshold <= 0 or not self.answered:
            return None
        same = self.digests == new.digest
        if same[: self.answered].any():  # released before: the same count again tells nothing new
            return None
        near = np.flatnonzero(
            (np.abs(self.sizes[: self.answered] - new.size) < self.threshold) & ~same[: self.answered]
        )
        for i in near.tolist():
            if np.abs(new.sketch - self.pool[i].sketch).sum() < self.threshold:
                return repr(self.pool[i].text[:120])
        return self._combination(new, same) or self._peeled(new, same)

    def _combination(self, new: RowSet, same: np.ndarray) -> str | None:
        """A sum ``A + B`` or a difference ``A - B`` of two sets that ``new`` is within the threshold of, one of
        them answered, the other answered or released with ``new``."""
        t, pool = self.threshold, self.pool
        for sign in (1, -1):  # new ≈ A + B (B's size near new's less A's), new ≈ A - B (B's near A's less new's)
            wanted = sign * (new.size - self.sizes)
            low = np.searchsorted(self.ordered, wanted - t, side="right")
            high = np.searchsorted(self.ordered, wanted + t, side="left")
            counts = np.maximum(high - low, 0)
            if not counts.sum():
                continue
            first = np.repeat(np.arange(len(pool)), counts)
            starts = np.repeat(low - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            second = self.order[np.arange(first.size) + starts]
            keep = (
                (first != second) & ((first < self.answered) | (second < self.answered)) & ~same[first] & ~same[second]
            )
            if sign == 1:
                keep &= first < second  # A + B and B + A are one sum
            first, second = first[keep], second[keep]
            for begin in range(0, first.size, 65536):
                i, j = first[begin : begin + 65536], second[begin : begin + 65536]
                coarse = np.abs(new.folded - self.folded[i] - sign * self.folded[j]).sum(axis=1)
                for a, b in zip(i[coarse < t].tolist(), j[coarse < t].tolist(), strict=True):
                    distance = np.abs(new.sketch - pool[a].sketch - sign * pool[b].sketch).sum()
                    exact = distance == 0 and new.mass == (pool[a].mass + sign * pool[b].mass) % 2**64
                    if distance < t and not exact:  # exactly A + B (or A - B): its count is known already
                        how = "together with" if sign == 1 else "less"
                        return f"{pool[a].text[:80]!r} {how} {pool[b].text[:80]!r}"
        return None

    def _peeled(self, new: RowSet, same: np.ndarray) -> str | None:
        """``new`` as a union of released sets but a few rows (or one of the smallest released sets holding it,
        less such a union): found by taking out, largest first, each released set that fits in what is left. A
        heuristic past three sets (a greedy cover, as far as the sketches tell): pairs and triples are exact."""
        sizes = self.sizes[: self.answered]
        candidates = ~same[: self.answered]
        found = self._peel(new.sketch, new.size, candidates)
        if found:
            return "the sum of " + found
        sketches = [p.sketch for p in self.pool[: self.answered]]
        holding = np.flatnonzero(candidates & (sizes > new.size) & (self.folded[: self.answered] >= new.folded).all(1))
        for i in holding[np.argsort(sizes[holding], kind="stable")][:PEEL_SUPERSETS].tolist():
            rest = sketches[i] - new.sketch
            if (rest >= 0).all():
                found = self._peel(rest, int(sizes[i] - new.size), candidates & (np.arange(self.answered) != i))
                if found:
                    return f"{self.pool[i].text[:80]!r} less the sum of {found}"
        return None

    def _peel(self, sketch: np.ndarray, size: int, candidates: np.ndarray) -> str | None:
        """The released sets (in words) whose union ``sketch`` is but for 1 to threshold - 1 rows, if greedy
        peeling finds them (two at least: one alone is the pair check's)."""
        rest, left, used = sketch.copy(), size, list[int]()
        folded = rest.reshape(FOLDED, -1).sum(axis=1)
        while left >= self.threshold:
            fits = candidates & (self.sizes[: self.answered] <= left) & (self.folded[: self.answered] <= folded).all(1)
            fits[used] = False
            chosen = None
            for i in np.flatnonzero(fits)[np.argsort(-self.sizes[: self.answered][fits], kind="stable")].tolist():
                if (self.pool[i].sketch <= rest).all():
                    chosen = i
                    break
            if chosen is None:
                return None
            used.append(chosen)
            rest -= self.pool[chosen].sketch
            folded -= self.folded[chosen]
            left -= int(self.sizes[chosen])
        if left > 0 and len(used) >= 2:
            return " and ".join(repr(self.pool[i].text[:60]) for i in used[:4]) + (" and more" if len(used) > 4 else "")
        return None


def _encode(sketch: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(sketch.astype("<u4").tobytes())).decode()


def _decode(text: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<u4").astype(np.int64)


class QueryLedger:
    """Every released set of rows at one site, in ``<site>/queries/released.jsonl`` (thread-safe)."""

    def __init__(self, site_dir: Path) -> None:
        self.dir = Path(site_dir) / LEDGER_DIR
        self.key = site_key(site_dir)
        self._lock = threading.Lock()
        self._entries: dict[str, list[tuple[str, str, RowSet]]] = {}  # dataset → (project, researcher, set)
        self._digests: set[tuple[str, str, str, str, str]] = set()
        self._load()

    def _load(self) -> None:
        path = self.dir / LEDGER_FILE
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                entry = RowSet(
                    _decode(row["sketch"]),
                    row["digest"],
                    int(row["size"]),
                    row.get("text", ""),
                    int(row["mass"]),
                    row.get("tag", ""),
                )
                self._add(row["project"], row["researcher"], row["dataset"], entry)

    def _add(self, project: str, researcher: str, dataset: str, entry: RowSet) -> bool:
        seen = (project, researcher, dataset, entry.digest, entry.tag)
        if seen in self._digests:
            return False
        self._digests.add(seen)
        self._entries.setdefault(dataset, []).append((project, researcher, entry))
        return True

    def keys(self, table: pd.DataFrame) -> np.ndarray:
        return row_keys(table, self.key)

    def row_set(self, keys: np.ndarray, rows: np.ndarray, text: str = "", tag: str = "") -> RowSet:
        return row_set(keys, rows, self.key, text, tag)

    def answered(self, scope: Scope, keys: np.ndarray) -> list[RowSet]:
        """The sets a new one in ``scope`` is checked against: the whole table, then those released in scope."""
        whole = self.row_set(keys, np.arange(keys.size), WHOLE_TABLE)
        with self._lock:
            entries = list(self._entries.get(scope.dataset, []))
        return [whole] + [
            entry
            for project, researcher, entry in entries
            if project == scope.project or researcher == scope.researcher
        ]

    def pending(self, scope: Scope, keys: np.ndarray, threshold: int, noise: int = 0) -> Pending:
        """One query's use of the ledger (``keys``: the dataset's row keys, :meth:`keys`; ``noise``: the most a
        released count moves, ``site_agent.queries.perturbation``)."""
        return Pending(self, scope, keys, threshold, noise)

    def record(self, scope: Scope, released: Sequence[RowSet]) -> None:
        """Enter ``released`` (each set once per project and researcher: the same set again adds nothing)."""
        lines = []
        with self._lock:
            for entry in released:
                if self._add(scope.project, scope.researcher, scope.dataset, entry):
                    lines.append(
                        json.dumps(
                            {
                                "project": scope.project,
                                "researcher": scope.researcher,
                                "dataset": scope.dataset,
                                "digest": entry.digest,
                                "size": entry.size,
                                "mass": entry.mass,
                                "tag": entry.tag,
                                "sketch": _encode(entry.sketch),
                                "text": entry.text[:300],
                                "time": time.time(),
                            }
                        )
                    )
            if lines:
                self.dir.mkdir(mode=0o700, exist_ok=True)
                with open(self.dir / LEDGER_FILE, "a") as fh:
                    fh.write("\n".join(lines) + "\n")


class Pending:
    """One query's use of the ledger, as ``site_agent.queries.statistics.Releases``: candidate sets checked against
    what was released in scope (and earlier in this query), the sets that leave collected and entered at
    :meth:`commit`, once the reply is sure to leave, and each count that leaves moved by its cell key.

    Sets are checked by what left of them (their ``tag``): a count (``""``) against every set whose count left, the
    values of a column (their mean, std, quantiles) against the sets whose values *of that column* left, since only
    two magnitudes of the same column over nearly the same rows give a patient's value away."""

    def __init__(self, ledger: QueryLedger, scope: Scope, keys: np.ndarray, threshold: int, noise: int = 0) -> None:
        self.ledger, self.scope, self.keys, self.threshold, self.noise = ledger, scope, keys, threshold, noise
        self.answered = ledger.answered(scope, keys)
        self.released: list[RowSet] = []
        self.withheld: list[dict[str, str]] = []  # what the ledger withheld, and why (for the audit log)

    def _before(self, tag: str) -> list[RowSet]:
        every = [*self.answered, *self.released]
        return every if not tag else [entry for entry in every if entry.tag == tag]

    def why(self, rows: np.ndarray, text: str) -> str | None:
        """Why the set ``rows`` may not be released (in words), or None."""
        return Check(self._before(""), self.threshold).why(self.ledger.row_set(self.keys, rows, text))

    def blocked(self, sets: list[tuple[np.ndarray, str]], tag: str = "") -> list[bool]:
        candidates = [self.ledger.row_set(self.keys, rows, text, tag) for rows, text in sets]
        check = Check(self._before(tag), self.threshold, extra=candidates)
        verdicts = []
        for candidate in candidates:
            why = check.why(candidate)
            if why is not None:  # the site's log and audit record say which; the researcher sees a withheld cell
                self.withheld.append({"set": candidate.text[:300], "near": why})
                log.info("withheld %r for project %s: within %d rows of %s", candidate.text[:200], self.scope.project,
                         self.threshold, why)  # fmt: skip
            verdicts.append(why is not None)
        return verdicts

    def release(self, rows: np.ndarray, text: str, tag: str = "") -> int:
        """Enter the set ``rows`` as leaving; the count that leaves for it (its cell key's move applied)."""
        entry = self.ledger.row_set(self.keys, rows, text, tag)
        self.released.append(entry)
        return perturbed(entry.size, cell_key(entry.digest, self.ledger.key), self.noise, self.threshold)

    def jitters(self, rows: np.ndarray, whats: list[str]) -> list[float]:
        """For each of ``whats``, a fraction in [-1, 1) fixed by the set ``rows`` and by it (0 where counts do not
        move)."""
        if self.noise <= 0:
            return [0.0] * len(whats)
        digest = self.ledger.row_set(self.keys, rows).digest
        return [jitter(cell_key(digest, self.ledger.key, what)) for what in whats]

    def commit(self) -> None:
        self.ledger.record(self.scope, self.released)


__all__ = [
    "BUCKETS",
    "FOLDED",
    "Pending",
    "WHOLE_TABLE",
    "QueryLedger",
    "RowSet",
    "Scope",
    "Check",
    "row_keys",
    "row_set",
    "site_key",
]
