"""A site's named cohorts: frozen once, the same when made again, refused when redefined or altered;
and a cohort's split is the dataset's split procedure applied to its rows."""

from __future__ import annotations

import json

import pytest

from flip_local.sites import HEART_SITES, HEART_SPLIT
from site_agent.data.catalog import init_site
from site_agent.data.formats import add_dataset, load_split, read_table
from site_agent.queries.cohorts import CohortRefused, CohortStore

from helpers import shared_data


def test_a_cohort_is_frozen_once_and_made_again_is_the_same(tmp_path) -> None:
    store = CohortStore(tmp_path)
    made = store.freeze("heart", "over50", "heart-disease", "age > 50", "sha256:f", [5, 1, 3])
    assert made.rows == (1, 3, 5) and made.hash.startswith("hmac-sha256:")
    assert store.freeze("heart", "over50", "heart-disease", "age > 50", "sha256:f", [1, 3, 5]) == made
    with pytest.raises(CohortRefused, match="already exists with another definition"):
        store.freeze("heart", "over50", "heart-disease", "age > 60", "sha256:f", [1])
    assert store.rows_for("heart", "over50", "heart-disease", "sha256:f") == [1, 3, 5]
    with pytest.raises(CohortRefused, match="changed since cohort 'over50' was made"):
        store.rows_for("heart", "over50", "heart-disease", "sha256:other")
    with pytest.raises(CohortRefused, match="no cohort 'under50'"):
        store.rows_for("heart", "under50", "heart-disease", "sha256:f")
    with pytest.raises(CohortRefused, match="cohort name .* is not allowed"):
        store.freeze("heart", "../x", "heart-disease", "", "sha256:f", [1])


def test_a_cohort_file_altered_after_it_was_made_is_refused(tmp_path) -> None:
    store = CohortStore(tmp_path)
    store.freeze("heart", "c", "heart-disease", "", "sha256:f", [1, 2, 3])
    path = tmp_path / "cohorts" / "heart" / "c.json"
    body = json.loads(path.read_text())
    body["rows"] = [1, 2, 3, 4]  # a row slipped in
    path.write_text(json.dumps(body))
    with pytest.raises(CohortRefused, match="altered"):
        store.rows_for("heart", "c", "heart-disease", "sha256:f")


def test_a_cohorts_split_is_the_split_of_a_copy_holding_only_its_rows(tmp_path) -> None:
    source = shared_data() / "heart-disease" / HEART_SITES["Hungary"]
    table = read_table(source, "uci-heart")
    rows = [int(i) for i in (table.index[table.age > 50])]
    copy = tmp_path / "copy.data"
    table.iloc[rows].to_csv(copy, header=False, index=False, na_rep="?")
    site = add_dataset(init_site(tmp_path / "site", "Hungary"), "heart-disease", source, "uci-heart", **HEART_SPLIT)
    site = add_dataset(site, "copy", copy, "uci-heart", **HEART_SPLIT)
    cohort_train, cohort_test = load_split(site, "heart-disease", rows=rows)
    copy_train, copy_test = load_split(site, "copy")
    assert len(cohort_train) + len(cohort_test) == len(rows)
    assert cohort_train.equals(copy_train) and cohort_test.equals(copy_test)
