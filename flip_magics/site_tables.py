"""The federation's sites as tables for the notebook: pure functions over ``GET /api/sites``'s answer."""

from __future__ import annotations

from typing import Any

import pandas as pd


def site_table(sites: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per site and dataset: its status, whether a task process is ready, its device, the rows."""
    rows = []
    for site in sites:
        for d in site["datasets"] or [{"name": "", "rows": None}]:
            rows.append(
                {
                    "site": site["site"],
                    "status": site["status"],
                    "warm": site.get("warm", False),
                    "device": site.get("device") or "",
                    "dataset": d["name"],
                    "rows": d["rows"],
                }
            )
    return pd.DataFrame(rows, columns=["site", "status", "warm", "device", "dataset", "rows"])


def inclusion_table(sites: list[dict[str, Any]]) -> pd.DataFrame:
    """Each imaging dataset's inclusion report at each site: the manifest's cases, those included, the patients,
    and the cases excluded for each reason (a column each); counts a site withholds are <NA>."""
    rows: list[dict[str, Any]] = []
    reasons: set[str] = set()
    for site in sites:
        for d in site["datasets"]:
            report = d.get("inclusion")
            if not report:
                continue
            excluded = report.get("excluded") or {}
            reasons.update(excluded)
            rows.append(
                {
                    "site": site["site"],
                    "dataset": d["name"],
                    "cases": report.get("cases"),
                    "included": report.get("included"),
                    "patients": report.get("patients"),
                    **{f"excluded: {r}": n for r, n in excluded.items()},
                }
            )
    columns = ["site", "dataset", "cases", "included", "patients", *(f"excluded: {r}" for r in sorted(reasons))]
    frame = pd.DataFrame(rows, columns=columns)
    for name in columns[2:]:
        frame[name] = pd.array([None if pd.isna(v) else int(v) for v in frame[name].tolist()], dtype="Int64")
    return frame
