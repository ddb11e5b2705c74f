"""An evaluation report (a cell's ``report()``: ``site_agent.tasks.reports``) made ready for review: its figures
re-encoded here, and the checks an admin reads beside it.

The task process wrote the report, so every byte of it is the researcher's code's choice. Its figures are decoded
and written again as plain PNG (pixels only: a text, EXIF or private chunk does not survive, nor anything after the
image's end), each at most :data:`MAX_PIXELS`; a figure that does not decode is dropped and named. What pixels
themselves show is for the admin's eyes: the "figures" check says so whenever there is one. Tables are checked for
small counts (a whole number above 0 and under the threshold may be a count of patients), and the report's text
(names, labels, a failed report's traceback) by the free-text checks.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from typing import Any

import pandas as pd

from site_agent.disclosure.checks import Check, count_checks

MAX_PIXELS = 4_000_000  # a figure larger than this (about 2000 x 2000) is dropped: it is not one to read by eye


def clean_report(content: bytes) -> tuple[bytes, list[str]]:
    """The report with each figure re-encoded as plain PNG (sorted keys, one canonical JSON), and the names of the
    figures dropped because they did not decode as an image of at most :data:`MAX_PIXELS`."""
    from PIL import Image

    report = json.loads(content)
    if not isinstance(report, dict):
        raise ValueError("a report is a JSON object")
    dropped: list[str] = []
    figures: dict[str, str] = {}
    for name, encoded in dict(report.get("figures") or {}).items():
        try:
            with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ValueError("too large")
                pixels = image.convert("RGBA" if "A" in image.getbands() else "RGB")
                out = io.BytesIO()
                pixels.save(out, format="PNG")  # no pnginfo: no text chunk is written
            figures[str(name)] = base64.b64encode(out.getvalue()).decode()
        except Exception:  # noqa: BLE001 - the task process's bytes: any failure to decode drops the figure
            dropped.append(str(name))
    report["figures"] = figures
    return json.dumps(report, sort_keys=True, indent=1).encode(), dropped


def report_checks(
    content: bytes, threshold: int, dropped: list[str], text_checks: Callable[[str], list[Check]]
) -> list[Check]:
    """The checks beside a cleaned report: small counts in its tables, its figures (for the eye), and the free-text
    checks (``text_checks``, with what the site knows of the dataset) over everything in it but the figures."""
    report = json.loads(content)
    checks: list[Check] = []
    counts = [
        {"table": name, "row": str(label), "column": column, "count": value}
        for name, table in (report.get("tables") or {}).items()
        for label, row in zip(table.get("index", []), table.get("rows", []), strict=False)
        for column, value in zip(table.get("columns", []), row, strict=False)
        if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and value >= 0)
    ]
    if counts:
        frame = pd.DataFrame(counts).set_index(["table", "row", "column"])
        checks += [c for c in count_checks(frame, threshold) if c.name == "small cells"]
    figures = sorted(report.get("figures") or {})
    said = f"{len(figures)} figure(s) ({', '.join(figures)[:150]}): look at each one (show --out DIR writes them); "
    said += "re-encoded here, pixels only"
    checks.append(Check("figures", not figures, said if figures else "none"))
    if dropped:
        checks.append(Check("figures dropped", False, f"not images this site reads, not kept: {', '.join(dropped)}"))
    if "error" in report:
        checks.append(Check("report failed", False, str(report["error"])[:200]))
    words = json.dumps({k: v for k, v in report.items() if k != "figures"}, indent=1)
    return checks + text_checks(words)


def figure_bytes(content: bytes) -> dict[str, bytes]:
    """The report's figures as PNG bytes, by name (for the admin's ``show --out`` and the notebook)."""
    report = json.loads(content)
    return {str(n): base64.b64decode(v) for n, v in (report.get("figures") or {}).items()}


def without_figures(content: bytes) -> dict[str, Any]:
    """The report with each figure replaced by its size, for reading in a terminal."""
    report = json.loads(content)
    report["figures"] = {
        n: f"<PNG, {len(base64.b64decode(v))} bytes>" for n, v in (report.get("figures") or {}).items()
    }
    return dict(report)
