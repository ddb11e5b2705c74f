"""An evaluation report made ready for a person's review: its figures re-encoded (nothing hidden beside the pixels
survives), its tables' small counts and its words checked, and a report() that is not one kept as what it is."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, PngImagePlugin

from site_agent.disclosure.report_review import MAX_PIXELS, clean_report, figure_bytes, report_checks
from site_agent.tasks.reports import encode_report


def _png_with_a_secret() -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "LEAK patient pt0007x")
    out = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 10, 10)).save(out, format="PNG", pnginfo=info)
    return out.getvalue() + b"trailing LEAK bytes after IEND"


def test_a_report_holds_numbers_tables_and_figures_by_name_and_nothing_else() -> None:
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [0, 1])
    text = encode_report(
        {
            "auc": np.float64(0.8),
            "confusion": np.array([[40, 3], [5, 52]]),
            "frame": pd.DataFrame({"n": [1, 2]}, index=["a", "b"]),
            "roc": figure,
            "note": object(),
        }
    )
    report = json.loads(text)
    assert report["metrics"] == {"auc": 0.8} and report["skipped"] == ["note"]
    assert report["tables"]["confusion"]["rows"] == [[40, 3], [5, 52]]
    assert report["tables"]["frame"]["index"] == ["a", "b"]
    assert base64.b64decode(report["figures"]["roc"]).startswith(b"\x89PNG")
    assert json.loads(encode_report([1, 2])) == {
        "error": "report() must return a dict of names to numbers, tables or figures"
    }


def test_a_figure_is_re_encoded_so_text_chunks_and_trailing_bytes_do_not_survive() -> None:
    raw = _png_with_a_secret()
    assert b"LEAK" in raw
    report = {"metrics": {}, "tables": {}, "figures": {"fig": base64.b64encode(raw).decode(), "junk": "bm90IGEgcG5n"}}
    cleaned, dropped = clean_report(json.dumps(report).encode())
    png = figure_bytes(cleaned)["fig"]
    assert b"LEAK" not in png and png.startswith(b"\x89PNG") and dropped == ["junk"]
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (20, 10) and image.getpixel((0, 0)) == (200, 10, 10)


def test_a_figure_too_large_to_read_by_eye_is_dropped() -> None:
    out = io.BytesIO()
    side = int(MAX_PIXELS**0.5) + 10
    Image.new("L", (side, side)).save(out, format="PNG")
    report = {"figures": {"huge": base64.b64encode(out.getvalue()).decode()}}
    cleaned, dropped = clean_report(json.dumps(report).encode())
    assert dropped == ["huge"] and figure_bytes(cleaned) == {}


def test_small_counts_figures_and_a_failed_report_are_named_beside_the_words_checks() -> None:
    report = {
        "metrics": {"auc": 0.8},
        "tables": {"confusion": {"columns": ["0", "1"], "index": ["0", "1"], "rows": [[40, 3], [5, 52]]}},
        "figures": {"roc": base64.b64encode(_png_with_a_secret()).decode()},
        "error": "report() failed",
    }
    cleaned, dropped = clean_report(json.dumps(report).encode())
    seen: list[str] = []
    checks = {c.name: c for c in report_checks(cleaned, 10, dropped, lambda text: seen.append(text) or [])}
    assert not checks["small cells"].passed and "confusion" in checks["small cells"].detail
    assert not checks["figures"].passed and "roc" in checks["figures"].detail
    assert not checks["report failed"].passed
    assert seen and '"confusion"' in seen[0] and "iVBOR" not in seen[0]  # the words, without the figures' bytes
