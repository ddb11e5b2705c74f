"""The differencing ledger: cohorts that differ by fewer rows than the threshold are caught, always;
the same cohort again is not a difference; the ledger survives a restart and holds no rows."""

from __future__ import annotations

import numpy as np
import pytest

from site_agent.queries.ledger import BUCKETS, QueryLedger, bucket_of_rows, closest, fingerprint

KEY = b"k" * 32


@pytest.mark.parametrize("removed", [1, 2, 9])
def test_a_cohort_a_few_rows_from_an_answered_one_is_caught(removed: int) -> None:
    buckets = bucket_of_rows(KEY, 5000)
    rng = np.random.default_rng(removed)
    answered = rng.choice(5000, 800, replace=False)
    near = fingerprint(answered[removed:], buckets, KEY)
    assert closest(near, [fingerprint(answered, buckets, KEY)], threshold=10) is not None


def test_a_swap_of_rows_is_a_difference_too() -> None:
    buckets = bucket_of_rows(KEY, 1000)
    cohort = np.arange(100, 400)
    swapped = np.concatenate([cohort[1:], [900]])  # one patient out, another in: same size
    assert closest(fingerprint(swapped, buckets, KEY), [fingerprint(cohort, buckets, KEY)], 10) is not None


def test_the_same_cohort_again_and_a_distant_one_pass() -> None:
    buckets = bucket_of_rows(KEY, 1000)
    cohort = fingerprint(np.arange(0, 300), buckets, KEY)
    again = fingerprint(np.arange(299, -1, -1), buckets, KEY)  # the same rows in another order
    distant = fingerprint(np.arange(0, 250), buckets, KEY)
    assert closest(again, [cohort], 10) is None
    assert closest(distant, [cohort], 10) is None


def test_the_ledger_keeps_fingerprints_not_rows_and_survives_a_restart(tmp_path) -> None:
    ledger = QueryLedger(tmp_path)
    cohort = ledger.cohort(np.arange(0, 200), 303, "age > 50")
    ledger.record("heart", "heart-disease", cohort)
    ledger.record("heart", "heart-disease", cohort)  # once only
    lines = (tmp_path / "queries" / "ledger.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "age > 50" in lines[0] and "[0, 1, 2" not in lines[0]
    again = QueryLedger(tmp_path)  # the same key, the same answered cohorts
    near = again.cohort(np.arange(0, 199), 303)
    assert again.too_close("heart", "heart-disease", near, 303, 10) is not None
    assert again.too_close("other-project", "heart-disease", near, 303, 10) is None
    assert (tmp_path / "queries" / "ledger.key").stat().st_mode & 0o077 == 0


def test_the_whole_table_counts_as_answered(tmp_path) -> None:
    ledger = QueryLedger(tmp_path)
    all_but_one = ledger.cohort(np.arange(1, 303), 303)
    refused = ledger.too_close("heart", "heart-disease", all_but_one, 303, 10)
    assert refused is not None and "whole table" in refused.text
    assert ledger.too_close("heart", "heart-disease", ledger.cohort(np.arange(303), 303), 303, 10) is None
    assert len(bucket_of_rows(KEY, 10)) == 10 and bucket_of_rows(KEY, 10).max() < BUCKETS
