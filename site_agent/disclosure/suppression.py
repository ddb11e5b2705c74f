"""Disclosure control for the count tables a site releases: small cells, and the cells that would give them away.

A count table leaves a site only after :func:`protect` has said which of its cells are withheld:

- **primary suppression**: a cell whose count is below the threshold is withheld, a true zero
  included, so that on the wire a small count and an empty cell look the same;
- **complementary suppression**: a *line* is a set of cells whose sum the researcher may know
  (the table's total, or a margin they can get from another query). Where a line holds withheld
  cells, the researcher can compute their sum as the line's sum minus its released cells. So in
  every such line the withheld cells must be at least two (one alone would be that difference
  exactly) and their true counts must add up to at least the threshold; otherwise the smallest
  released cell of the line (ties: the lowest index) is withheld too, and the lines are looked at
  again until none changes.

This is the standard greedy heuristic (the one DataSHIELD-style and vantage6-style table controls
use), not an exact linear-programming audit: it makes every line safe on its own, but a researcher
who solves all the lines together, with the counts' nonnegativity, may still narrow a withheld cell
to an interval narrower than the threshold. An exact audit would solve those programmes per cell;
tables here are small (at most 40 levels a column, three columns) and this is the usual trade-off.

Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

AUDIT_MAX_WITHHELD = 1500  # above this many withheld cells the linear audit (an SVD) is skipped


def line_sets(shape: tuple[int, ...]) -> list[np.ndarray]:
    """The lines of a C-ordered table of ``shape``: every 1-D slice along every axis, then the whole table.

    Each line is an array of indexes into the flattened table. A 0-dimensional table (a plain count)
    has one line, its one cell.
    """
    size = math.prod(shape)
    index = np.arange(size, dtype=np.intp).reshape(shape)
    lines: list[np.ndarray] = []
    if size:
        for axis, length in enumerate(shape):
            lines.extend(np.moveaxis(index, axis, -1).reshape(-1, length))
    lines.append(index.ravel())
    return lines


def line_is_safe(counts: np.ndarray, withheld: np.ndarray, line: np.ndarray, threshold: int) -> bool:
    """Whether the withheld cells of ``line`` cannot be told apart from its sum: none, or at least two
    whose true counts add up to at least ``threshold``."""
    hidden = line[withheld[line]]
    if hidden.size == 0:
        return True
    return hidden.size >= 2 and int(counts[hidden].sum()) >= threshold


def protect(
    counts: np.ndarray, lines: Sequence[np.ndarray], threshold: int, forced: np.ndarray | None = None
) -> np.ndarray:
    """Which cells of the flat table ``counts`` (true, integer counts) to withhold, as a bool array.

    ``lines`` are index arrays of cells whose sums the researcher may know (see :func:`line_sets`); ``forced``
    (bool per cell) marks cells withheld whatever their count (the site's ledger found their rows too close to rows
    it released before), whose lines are then made safe like those of small cells.
    A line that has no released cell left and is still not safe stays so: nothing in it can help
    (where that line is the whole table, the caller withholds the total). After the greedy pass,
    :func:`determined` looks for withheld cells that the safe lines give away together; each one found
    costs the smallest released cell of its lines, and the greedy pass runs again.
    """
    counts = np.asarray(counts, dtype=np.int64).ravel()
    withheld = counts < threshold
    if forced is not None:
        withheld |= np.asarray(forced, dtype=bool).ravel()
    lines = [np.asarray(line, dtype=np.intp).ravel() for line in lines]
    # the lines each cell is in, so that withholding a cell looks again only at the lines it can change
    lines_of: list[list[int]] = [[] for _ in range(counts.size)]
    for number, line in enumerate(lines):
        for cell in line.tolist():
            lines_of[cell].append(number)
    todo = list(range(len(lines)))
    while True:
        _cover(counts, withheld, lines, lines_of, todo, threshold)
        # a stuck line's sum is itself below the threshold, withheld wherever it is asked for
        exposed = determined(withheld, [line for line in lines if line_is_safe(counts, withheld, line, threshold)])
        if exposed.size == 0:
            return withheld
        near = np.unique(np.concatenate([lines[n] for e in exposed.tolist() for n in lines_of[e]] or [exposed]))
        released = near[~withheld[near]]
        if released.size == 0:
            released = np.flatnonzero(~withheld)
        if released.size == 0:
            return withheld
        cell = _smallest(counts, released)
        withheld[cell] = True
        todo = lines_of[cell]


def _smallest(counts: np.ndarray, cells: np.ndarray) -> int:
    """The cell with the smallest count, the lowest index among equals."""
    return int(cells[np.lexsort((cells, counts[cells]))[0]])


def _cover(
    counts: np.ndarray,
    withheld: np.ndarray,
    lines: list[np.ndarray],
    lines_of: list[list[int]],
    todo: list[int],
    threshold: int,
) -> None:
    """The greedy pass: withhold the smallest released cell of an unsafe line until no line it can help is left."""
    queue = deque(todo)
    queued = [False] * len(lines)
    for number in todo:
        queued[number] = True
    while queue:
        number = queue.popleft()
        queued[number] = False
        line = lines[number]
        while not line_is_safe(counts, withheld, line, threshold):
            released = line[~withheld[line]]
            if released.size == 0:
                break
            cell = _smallest(counts, released)
            withheld[cell] = True
            for other in lines_of[cell]:
                if other != number and not queued[other]:
                    queued[other] = True
                    queue.append(other)


def determined(withheld: np.ndarray, lines: Sequence[np.ndarray]) -> np.ndarray:
    """The withheld cells that the sums of ``lines`` and the released cells give exactly, together.

    Each line's sum minus its released cells is a linear equation in its withheld cells; a cell is
    determined when every solution of the equations gives it the same value, i.e. when it is zero in
    every vector of their null space. (Nonnegativity is ignored: this finds exact disclosure, not
    narrow intervals.) Tables with more than ``AUDIT_MAX_WITHHELD`` withheld cells are not audited.
    """
    hidden = np.flatnonzero(withheld)
    if hidden.size == 0 or hidden.size > AUDIT_MAX_WITHHELD:
        return np.zeros(0, dtype=np.intp)
    column = np.full(withheld.size, -1, dtype=np.intp)
    column[hidden] = np.arange(hidden.size)
    rows = [column[line[withheld[line]]] for line in lines]
    equations = np.zeros((max(1, len(rows)), hidden.size))
    for i, cells in enumerate(rows):
        equations[i, cells] = 1.0
    _, singular, right = np.linalg.svd(equations)
    rank = int((singular > 1e-9 * max(1.0, float(singular[0]))).sum())
    null = right[rank:]
    free = np.abs(null).max(axis=0) > 1e-9 if null.shape[0] else np.zeros(hidden.size, dtype=bool)
    return np.asarray(hidden[~free], dtype=np.intp)


__all__ = ["AUDIT_MAX_WITHHELD", "determined", "line_is_safe", "line_sets", "protect"]
