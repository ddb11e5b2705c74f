"""The ledger of released sets of rows: a set within the threshold of a released one, or of a sum or difference
of two, is caught, always; the same set again is not a difference; entries are keyed by rows' content (they
survive a file registered again with its rows reordered), span a researcher's projects, hold no rows, and
survive a restart."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from site_agent.queries.ledger import BUCKETS, WHOLE_TABLE, Check, QueryLedger, Scope, row_keys, row_set

KEY = b"k" * 32
ROWS = np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64)  # 5000 distinct row keys
SCOPE = Scope("heart", "alice", "heart-disease")


def entry(rows: np.ndarray | range, text: str = "") -> object:
    return row_set(ROWS, np.asarray(rows), KEY, text)


@pytest.mark.parametrize("removed", [1, 2, 9])
def test_a_set_a_few_rows_from_a_released_one_is_caught(removed: int) -> None:
    answered = np.random.default_rng(removed).choice(5000, 800, replace=False)
    assert Check([entry(answered, "A")], threshold=10).why(entry(answered[removed:])) == "'A'"


def test_a_swap_of_rows_is_a_difference_too() -> None:
    cohort = np.arange(100, 400)
    swapped = np.concatenate([cohort[1:], [900]])  # one patient out, another in: same size
    assert Check([entry(cohort, "A")], 10).why(entry(swapped)) is not None


def test_the_same_set_again_and_a_distant_one_pass() -> None:
    check = Check([entry(range(0, 300), "A")], 10)
    assert check.why(entry(np.arange(299, -1, -1))) is None  # the same rows in another order
    assert check.why(entry(range(0, 250))) is None
    assert Check([entry(range(0, 300))], 10).why(entry(range(0, 290))) is None  # exactly the threshold apart


def test_a_union_of_two_released_sets_but_a_few_rows_is_caught() -> None:
    a, b = entry(range(0, 300), "A"), entry(range(300, 700), "B")
    assert Check([a, b], 10).why(entry(range(0, 699))) == "'A' together with 'B'"
    assert Check([a, b], 10).why(entry(range(0, 700))) is None  # exactly A and B: their counts are known
    assert Check([a, b], 10).why(entry(range(0, 650))) is None  # 50 rows short of it: far enough


def test_a_released_set_less_another_but_a_few_rows_is_caught() -> None:
    a, c = entry(range(0, 300), "A"), entry(range(0, 100), "C")
    assert Check([a, c], 10).why(entry(range(101, 300))) == "'A' less 'C'"
    assert Check([a, c], 10).why(entry(range(100, 300))) is None  # exactly A less C: its count is known


def test_the_union_of_two_released_sets_that_overlap_by_a_few_rows_is_caught() -> None:
    a, d = entry(range(0, 300), "A"), entry(range(295, 600), "D")  # their union's count gives the 5 in both
    assert Check([a, d], 10).why(entry(range(0, 600))) == "'A' together with 'D'"


def test_a_set_released_alongside_stands_in_a_combination_but_is_not_compared_alone() -> None:
    a = entry(range(0, 300), "A")
    sibling = entry(range(300, 400), "the table's other cell")
    check = Check([a], 10, extra=[sibling])
    assert check.why(entry(range(0, 399))) == "'A' together with \"the table's other cell\""
    assert check.why(entry(range(302, 400))) is None  # its own table's lines say whether it may leave


def test_row_keys_are_the_rows_content_keyed_by_the_site() -> None:
    table = pd.DataFrame({"age": [50, 61, 70, 50], "sex": [1, 0, 1, 1]})
    keys = row_keys(table, KEY)
    assert keys[0] == keys[3] and len(set(keys.tolist())) == 3  # the same values, the same key
    moved = row_keys(table.iloc[[2, 0, 1, 3]].reset_index(drop=True), KEY)
    assert sorted(moved.tolist()) == sorted(keys.tolist())  # reordered: the same keys
    assert not set(row_keys(table, b"x" * 32).tolist()) & set(keys.tolist())  # another site: other keys


def test_the_ledger_spans_a_researchers_projects_holds_no_rows_and_survives_a_restart(tmp_path) -> None:
    ledger = QueryLedger(tmp_path)
    pending = ledger.pending(SCOPE, ROWS[:303], 10)
    pending.release(np.arange(0, 200), "age > 50")
    pending.release(np.arange(0, 200), "age > 50")  # once only
    pending.commit()
    lines = (tmp_path / "queries" / "released.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "age > 50" in lines[0] and "[0, 1, 2" not in lines[0]
    again = QueryLedger(tmp_path)  # the same key, the same released sets
    near = np.arange(0, 199)
    assert again.pending(SCOPE, ROWS[:303], 10).why(near, "") == "'age > 50'"
    assert again.pending(Scope("other", "alice", "heart-disease"), ROWS[:303], 10).why(near, "") is not None
    assert again.pending(Scope("other", "bob", "heart-disease"), ROWS[:303], 10).why(near, "") is None
    assert again.pending(Scope("heart", "alice", "another"), ROWS[:303], 10).why(near, "") is None
    assert (tmp_path / "queries" / "ledger.key").stat().st_mode & 0o077 == 0


def test_a_file_registered_again_with_its_rows_reordered_keeps_what_was_released(tmp_path) -> None:
    table = pd.DataFrame({"age": np.arange(300) % 80 + 20, "chol": np.arange(300) * 3})
    ledger = QueryLedger(tmp_path)
    pending = ledger.pending(SCOPE, ledger.keys(table), 10)
    pending.release(np.flatnonzero(table.age > 50), "age > 50")
    pending.commit()
    reordered = table.sample(frac=1.0, random_state=1).reset_index(drop=True)
    later = ledger.pending(SCOPE, ledger.keys(reordered), 10)
    one_less = np.flatnonzero((reordered.age > 50) & (reordered.chol != 3 * 60))  # the same rows but one
    assert later.why(one_less, "") == "'age > 50'"


def test_the_whole_table_counts_as_released(tmp_path) -> None:
    pending = QueryLedger(tmp_path).pending(SCOPE, ROWS[:303], 10)
    assert pending.why(np.arange(1, 303), "") == repr(WHOLE_TABLE)
    assert pending.why(np.arange(303), "") is None
    assert pending.blocked([(np.arange(1, 303), "all but one"), (np.arange(0, 150), "half")]) == [True, False]
    assert row_set(ROWS, np.arange(10), KEY).sketch.size == BUCKETS


def test_a_union_of_three_released_sets_and_one_more_row_is_caught_and_its_complement_too() -> None:
    a, b, c = entry(range(0, 100), "A"), entry(range(100, 250), "B"), entry(range(250, 400), "C")
    assert Check([a, b, c], 10).why(entry([*range(0, 400), 4000])) == "the sum of 'B' and 'C' and 'A'"
    assert Check([a, b, c], 10).why(entry(range(0, 400))) is None  # exactly the three: their counts are known
    assert Check([a, b, c], 10).why(entry(range(0, 420))) is None  # 20 rows more: far enough
    whole = entry(range(0, 5000), "W")
    assert Check([whole, a, b, c], 10).why(entry(range(401, 5000))) == "'W' less the sum of 'B' and 'C' and 'A'"
