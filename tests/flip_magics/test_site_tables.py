"""The sites' tables the notebook shows, from the coordinator's answer (plain data, no federation)."""

from __future__ import annotations

import pandas as pd

from flip_magics.site_tables import inclusion_table, site_table

SITES = [
    {
        "site": "A",
        "status": "online",
        "warm": True,
        "device": "cuda:0",
        "datasets": [
            {"name": "heart", "rows": 200},
            {
                "name": "scans",
                "rows": 90,
                "inclusion": {"cases": 100, "included": 90, "patients": 80, "excluded": {"no label": None}},
            },
        ],
    },
    {"site": "B", "status": "offline", "datasets": []},
]


def test_each_site_says_its_device_and_a_site_without_datasets_still_has_a_row() -> None:
    table = site_table(SITES)
    assert table.drop(columns="rows").to_dict("records") == [
        {"site": "A", "status": "online", "warm": True, "device": "cuda:0", "dataset": "heart"},
        {"site": "A", "status": "online", "warm": True, "device": "cuda:0", "dataset": "scans"},
        {"site": "B", "status": "offline", "warm": False, "device": "", "dataset": ""},
    ]
    assert table.rows.tolist()[:2] == [200, 90] and pd.isna(table.rows.iloc[2])


def test_the_inclusion_table_has_a_column_per_reason_and_withheld_counts_are_missing() -> None:
    table = inclusion_table(SITES)
    assert list(table.columns) == ["site", "dataset", "cases", "included", "patients", "excluded: no label"]
    assert table.iloc[0]["included"] == 90 and pd.isna(table.iloc[0]["excluded: no label"])
    assert str(table["cases"].dtype) == "Int64"
    assert len(inclusion_table([SITES[1]])) == 0  # tables only: no imaging dataset, no row
