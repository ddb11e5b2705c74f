"""A cell's ``report()`` as the task process writes it for the site's airlock: numbers, tables and figures as JSON.

A cell may define ``report(model, data, config)``; the run's final evaluation step calls it after ``evaluate()`` with
the final model and returns what it gives in the step's claim (``StepResult.report``). The agent keeps it in the
airlock (``site_agent.governance.airlock``) and nothing of it leaves unless a person at the site releases it; the
step itself never fails because of it (a report that fails is kept as its traceback, for the same review).

What a report may hold, by name: a number (a metric), a table (a DataFrame, or anything numpy reads as 2-D: a
confusion matrix), a figure (anything with matplotlib's ``savefig``: written as PNG here). Nothing else.
"""

from __future__ import annotations

import base64
import io
import json
import math
import traceback
from typing import Any

from flip_core.airlock import MAX_ITEM_BYTES

MAX_ENTRIES = 50
FIGURE_DPI = 100


def encode_report(value: Any) -> str:
    """``value`` (what ``report()`` returned) as the report's JSON: ``metrics``, ``tables``, ``figures`` (base64 PNG)
    and ``skipped`` (names of entries that were none of those); or ``error`` in a sentence."""
    if not isinstance(value, dict):
        return _error("report() must return a dict of names to numbers, tables or figures")
    out: dict[str, Any] = {"metrics": {}, "tables": {}, "figures": {}, "skipped": []}
    for raw_name, entry in list(value.items())[:MAX_ENTRIES]:
        name = str(raw_name)[:100]
        try:
            kind, encoded = _entry(entry)
        except Exception:  # noqa: BLE001 - the cell's objects: how they fail to encode is theirs
            out["skipped"].append(name)
            continue
        if kind:
            out[kind][name] = encoded
        else:
            out["skipped"].append(name)
    text = json.dumps(out, sort_keys=True, allow_nan=False, default=str)
    if len(text.encode()) > MAX_ITEM_BYTES:
        return _error(f"the report is {len(text.encode())} bytes, more than an airlock item holds ({MAX_ITEM_BYTES})")
    return text


def failed_report() -> str:
    """A report() that raised: its traceback, kept for the same review (call inside the ``except``)."""
    return json.dumps({"error": "report() failed", "traceback": traceback.format_exc()[-20_000:]})


def _entry(entry: Any) -> tuple[str, Any]:
    if hasattr(entry, "savefig"):
        buffer = io.BytesIO()
        entry.savefig(buffer, format="png", dpi=FIGURE_DPI)
        return "figures", base64.b64encode(buffer.getvalue()).decode()
    if isinstance(entry, bool):
        return "", None
    if isinstance(entry, (int, float)) or (hasattr(entry, "item") and getattr(entry, "ndim", 1) == 0):
        number = float(entry.item() if hasattr(entry, "item") else entry)
        return ("metrics", number) if math.isfinite(number) else ("", None)
    if hasattr(entry, "to_numpy") and hasattr(entry, "columns"):  # a DataFrame
        rows = [[_cell(v) for v in row] for row in entry.to_numpy().tolist()]
        return "tables", {
            "columns": [str(c) for c in entry.columns],
            "index": [str(i) for i in entry.index],
            "rows": rows,
        }
    import numpy as np

    array = np.asarray(entry)
    if array.ndim == 2 and array.size <= 10_000:
        rows = [[_cell(v) for v in row] for row in array.tolist()]
        return "tables", {
            "columns": [str(i) for i in range(array.shape[1])],
            "index": [str(i) for i in range(array.shape[0])],
            "rows": rows,
        }
    return "", None


def _cell(value: Any) -> Any:
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return str(value)[:200]


def _error(sentence: str) -> str:
    return json.dumps({"error": sentence})
