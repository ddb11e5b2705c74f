"""A run record as ``flip show`` prints it: what ran, on what, by whom, and what came out."""

from __future__ import annotations

import time
from typing import Any

from flip_core.records import final_metrics
from flip_core.runs import RunRecord, SiteEnvironment, SiteUse


def _when(stamp: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp))) if stamp else "-"


def _short(value: Any, n: int = 19) -> str:
    text = str(value or "-")
    return text if len(text) <= n else text[:n] + "…"


def _packages(packages: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((packages or {}).items())) or "-"


def describe(record: RunRecord) -> str:
    """The record in a screenful; ``flip show --json`` prints all of it."""
    nb, cohort = record.notebook, record.cohort
    lines = [
        f"run {record.run_id} {record.name!r}: {record.status}" + (f" ({record.reason})" if record.reason else ""),
        f"  by {record.researcher} in project {record.project}, {_when(record.created)} → {_when(record.finished)}",
        f"  dataset {record.dataset}" + (f", cohort {cohort.name} ({cohort.where})" if cohort else ""),
        f"  {record.rounds} rounds of {record.strategy}, seed {record.seed}, config {record.config}",
        f"  cell {record.source_hash}",
        f"  notebook {nb.path or '-'} (sha256 {_short(nb.sha256, 12)}), parameters {nb.parameters}"
        if nb
        else "  notebook: none recorded (not made by `flip run`)",
        f"  hub: {_packages(record.hub_packages)}; packages {_short(record.hub_environment, 18)}",
        f"  notebook kernel: {_packages(record.client_packages)}; packages {_short(record.client_environment, 18)}",
        f"  model {_short(record.model_sha256, 16)}; updates summed "
        + ("in the sites' order" if record.aggregation_ordered is not False else "as they arrived"),
        "  sites:",
    ]
    lines += [_site_line(record, site) for site in record.sites]
    if record.epsilon_spent:
        lines.append(f"  epsilon spent: {record.epsilon_spent}")
    metrics = final_metrics([r for r in record.history if r.phase in ("evaluate", "train")])
    if metrics:
        lines.append("  final metrics:")
        for series in sorted(metrics, key=lambda s: (s != "global", s)):
            text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics[series].items()))
            lines.append(f"    {series:<14} {text}")
    return "\n".join(lines)


def _site_line(record: RunRecord, site: str) -> str:
    """One taking site: its split, device, data fingerprint, torch, package set and the bytes it moved."""
    used = record.site_info.get(site) or SiteUse()
    env = record.site_packages.get(site) or SiteEnvironment()
    announced = record.site_datasets.get(site)
    moved = sum(t.received_bytes + t.sent_bytes for t in record.traffic.get(site, []))
    fingerprint = used.fingerprint or (announced.fingerprint if announced else None)
    train = "-" if used.train_rows is None else used.train_rows
    test = "-" if used.test_rows is None else used.test_rows
    return (
        f"    {site:<14} train {train}, test {test}, "
        f"{used.device or '-'}, data {_short(fingerprint, 16)}, "
        f"torch {env.packages.get('torch', '-')}, packages {_short(env.hash, 18)}, "
        f"{moved / 1e6:.1f} MB moved"
    )


__all__ = ["describe"]
