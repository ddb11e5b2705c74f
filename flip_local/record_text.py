"""A run record as ``flip show`` prints it: what ran, on what, by whom, and what came out."""

from __future__ import annotations

import time
from typing import Any

from flip_core.records import final_metrics


def _when(stamp: Any) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(stamp))) if stamp else "-"


def _short(value: Any, n: int = 19) -> str:
    text = str(value or "-")
    return text if len(text) <= n else text[:n] + "…"


def _packages(packages: dict[str, Any] | None) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted((packages or {}).items())) or "-"


def describe(record: dict[str, Any]) -> str:
    """The record in a screenful; ``flip show --json`` prints all of it."""
    nb = record.get("notebook") or {}
    lines = [
        f"run {record.get('run_id')} {record.get('name')!r}: {record.get('status')}"
        + (f" ({record['reason']})" if record.get("reason") else ""),
        f"  by {record.get('researcher')} in project {record.get('project')}, "
        f"{_when(record.get('created'))} → {_when(record.get('finished'))}",
        f"  dataset {record.get('dataset')}"
        + (f", cohort {record['cohort']['name']} ({record['cohort']['where']})" if record.get("cohort") else ""),
        f"  {record.get('rounds')} rounds of {record.get('strategy')}, seed {record.get('seed')}, "
        f"config {record.get('config') or {}}",
        f"  cell {record.get('source_hash')}",
        f"  notebook {nb.get('path', '-')} (sha256 {_short(nb.get('sha256'), 12)}), "
        f"parameters {nb.get('parameters', {})}"
        if nb
        else "  notebook: none recorded (not made by `flip run`)",
        f"  hub: {_packages(record.get('hub_packages'))}; packages {_short(record.get('hub_environment'), 18)}",
        f"  notebook kernel: {_packages(record.get('client_packages'))}; "
        f"packages {_short(record.get('client_environment'), 18)}",
        f"  model {_short(record.get('model_sha256'), 16)}; updates summed "
        + ("in the sites' order" if record.get("aggregation_ordered") is not False else "as they arrived"),
        "  sites:",
    ]
    info, datasets, envs = record.get("site_info") or {}, record.get("site_datasets") or {}, record.get("site_packages")
    traffic = record.get("traffic") or {}
    for site in record.get("sites") or []:
        used, env = info.get(site) or {}, (envs or {}).get(site) or {}
        moved = sum(t.get("received_bytes", 0) + t.get("sent_bytes", 0) for t in traffic.get(site, []))
        fingerprint = used.get("fingerprint") or (datasets.get(site) or {}).get("fingerprint")
        lines.append(
            f"    {site:<14} train {used.get('train_rows', '-')}, test {used.get('test_rows', '-')}, "
            f"{used.get('device') or '-'}, data {_short(fingerprint, 16)}, "
            f"torch {(env.get('packages') or {}).get('torch', '-')}, packages {_short(env.get('hash'), 18)}, "
            f"{moved / 1e6:.1f} MB moved"
        )
    if record.get("epsilon_spent"):
        lines.append(f"  epsilon spent: {record['epsilon_spent']}")
    metrics = final_metrics([r for r in record.get("history") or [] if r["phase"] in ("evaluate", "train")])
    if metrics:
        lines.append("  final metrics:")
        for series in sorted(metrics, key=lambda s: (s != "global", s)):
            text = ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics[series].items()))
            lines.append(f"    {series:<14} {text}")
    return "\n".join(lines)


__all__ = ["describe"]
