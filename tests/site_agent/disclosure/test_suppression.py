"""Small-cell and complementary suppression (site_agent.disclosure.suppression) on tables small enough to check
by hand."""

from __future__ import annotations

import numpy as np
import pytest

from site_agent.disclosure.suppression import determined, line_is_safe, line_sets, protect

T = 10  # the threshold these tests use


def determined_cells(counts: np.ndarray, withheld: np.ndarray, lines: list[np.ndarray]) -> list[int]:
    """The withheld cells a researcher can solve exactly from the lines' sums and the released cells.

    Each line's sum minus its released cells is a linear equation in the withheld cells; a cell is
    determined when its unit vector lies in the span of those equations (nonnegativity is ignored,
    so this can only find fewer determined cells than an exact integer audit, never more)."""
    hidden = np.flatnonzero(withheld)
    if hidden.size == 0:
        return []
    equations = np.array([np.isin(hidden, line).astype(float) for line in lines])
    rank = np.linalg.matrix_rank(equations)
    found = []
    for j, cell in enumerate(hidden):
        unit = np.zeros(hidden.size)
        unit[j] = 1.0
        if np.linalg.matrix_rank(np.vstack([equations, unit])) == rank:
            found.append(int(cell))
    return found


def test_line_sets_are_every_slice_along_every_axis_then_the_whole_table() -> None:
    lines = [line.tolist() for line in line_sets((2, 3))]
    assert lines == [[0, 3], [1, 4], [2, 5], [0, 1, 2], [3, 4, 5], [0, 1, 2, 3, 4, 5]]
    three = line_sets((2, 3, 4))
    assert len(three) == 3 * 4 + 2 * 4 + 2 * 3 + 1
    assert sorted(three[-1].tolist()) == list(range(24))
    for line in three[:-1]:  # each slice varies one index only
        coords = np.array(np.unravel_index(line, (2, 3, 4)))
        assert sum(len(set(axis)) > 1 for axis in coords) == 1
    assert [line.tolist() for line in line_sets(())] == [[0]]  # a plain count: its one cell


def test_a_small_count_and_a_true_zero_are_both_withheld() -> None:
    counts = np.array([0, 1, 9, 10, 250])
    withheld = protect(counts, [], T)
    assert withheld.tolist() == [True, True, True, False, False]
    assert withheld.dtype == bool and withheld.shape == counts.shape


def test_the_smallest_released_cell_of_a_line_is_withheld_until_its_mass_reaches_the_threshold() -> None:
    counts = np.array([3, 60, 50, 70])
    withheld = protect(counts, [np.arange(4)], T)
    assert withheld.tolist() == [True, False, True, False]  # 3 alone would be the total minus the rest
    # ties: the lowest index goes first
    assert protect(np.array([20, 3, 20]), [np.arange(3)], T).tolist() == [True, True, False]


def test_enough_withheld_mass_needs_no_complementary_cell() -> None:
    counts = np.array([4, 4, 4, 50])
    assert protect(counts, [np.arange(4)], T).tolist() == [True, True, True, False]
    assert protect(np.array([0, 9, 30]), [np.arange(3)], T).tolist() == [True, True, True]  # 0 + 9 < 10


def test_a_line_with_one_withheld_cell_is_never_left_so_even_if_that_cell_is_large() -> None:
    # 3 is withheld; in its row 50 is withheld to cover it, and in its column 20. The mass rule alone would
    # then leave column 1 with 50 as its only withheld cell: the margin minus 30 gives 50, and row 0 gives 3.
    counts = np.array([3, 50, 20, 30])
    lines = line_sets((2, 2))
    withheld = protect(counts, lines, T)
    assert withheld.tolist() == [True, True, True, True]
    assert determined_cells(counts, withheld, lines) == []
    mass_rule_only = np.array([True, True, True, False])
    assert determined_cells(counts, mass_rule_only, lines) == [0, 1, 2]  # what the second rule prevents


def test_a_line_that_cannot_be_made_safe_is_left_for_the_caller() -> None:
    counts = np.array([2, 3])
    whole = np.arange(2)
    withheld = protect(counts, [whole], T)
    assert withheld.tolist() == [True, True]
    assert not line_is_safe(counts, withheld, whole, T)  # the caller withholds the total
    assert line_is_safe(np.array([2, 30]), np.array([True, True]), whole, T)
    assert line_is_safe(np.array([2, 30]), np.array([False, False]), whole, T)
    assert not line_is_safe(np.array([2, 30]), np.array([False, True]), whole, T)  # one withheld: its value


def test_two_way_table_keeps_every_row_and_column_safe() -> None:
    counts = np.array([[25, 2, 40, 31], [18, 60, 7, 44], [90, 35, 12, 0]]).ravel()
    lines = line_sets((3, 4))
    withheld = protect(counts, lines, T)
    assert withheld[[1, 6, 11]].all()  # 2, 7 and the zero
    for line in lines:
        assert line_is_safe(counts, withheld, line, T)
    assert determined_cells(counts, withheld, lines) == []
    assert not withheld[counts == 90].any()  # cells that need no cover stay released


def test_the_linear_audit_catches_what_safe_lines_give_away_together() -> None:
    # a 3x3x3 table where every line is safe after the greedy pass (or fully withheld: 3 + 3 + 1), and still
    # the lines together pin twelve withheld cells down: the audit withholds more until none is
    counts = np.array(
        [40, 3, 120, 8, 40, 120, 3, 120, 14, 120, 3, 9, 14, 120, 3, 9, 40, 40, 120, 1, 120, 1, 40, 40, 120, 40, 14]
    )
    greedy = np.array([1, 1, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 0, 1, 1], dtype=bool)
    lines = line_sets((3, 3, 3))
    assert all(line_is_safe(counts, greedy, line, T) or greedy[line].all() for line in lines)
    assert determined(greedy, lines).tolist() == [2, 6, 8, 10, 11, 12, 14, 15, 16, 23, 25, 26]
    assert determined_cells(counts, greedy, lines) == [2, 6, 8, 10, 11, 12, 14, 15, 16, 23, 25, 26]  # the oracle agrees
    withheld = protect(counts, lines, T)
    assert (withheld >= greedy).all() and determined_cells(counts, withheld, lines) == []
    assert not withheld.all()
    assert determined(np.array([True, False]), [np.array([0, 1])]).tolist() == [0]  # one withheld: the difference


@pytest.mark.parametrize("shape", [(7,), (3, 4), (5, 2), (2, 3, 4), (3, 3, 3)])
def test_protect_reaches_a_fixed_point_where_no_line_can_be_made_safer(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(sum(shape))
    lines = line_sets(shape)
    for _ in range(25):
        counts = rng.choice([0, 1, 3, 8, 9, 10, 14, 40, 120], size=int(np.prod(shape)))
        withheld = protect(counts, lines, T)
        assert withheld[counts < T].all()
        for line in lines:  # safe, or nothing left in it to withhold
            assert line_is_safe(counts, withheld, line, T) or withheld[line].all()
        assert (protect(counts, lines, T) == withheld).all()  # deterministic
        assert determined_cells(counts, withheld, lines) == []


def test_threshold_one_withholds_only_zeros_and_what_covers_them() -> None:
    counts = np.array([0, 1, 2, 5])
    assert protect(counts, [np.arange(4)], 1).tolist() == [True, True, False, False]
    assert not protect(counts, [np.arange(4)], 0).any()  # no threshold: nothing is withheld
