"""Behaviour tests for flip_magics.chart (pure SVG/HTML renderers)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from flip_magics.chart import render_chart, render_header, render_site_table

NS = {"svg": "http://www.w3.org/2000/svg"}


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _yticks(root: ET.Element) -> list[float]:
    group = root.find("svg:g[@class='yticks']", NS)
    assert group is not None
    return [float(t.text or "") for t in group.findall("svg:text", NS)]


def _xticks(root: ET.Element) -> list[str]:
    group = root.find("svg:g[@class='xticks']", NS)
    assert group is not None
    return [t.text or "" for t in group.findall("svg:text", NS)]


POINTS = [
    ("loss", 1, 0.9),
    ("loss", 2, 0.6),
    ("loss", 3, 0.4),
    ("accuracy", 1, 0.55),
    ("accuracy", 2, 0.7),
    ("accuracy", 3, 0.81),
]


def test_render_chart_is_valid_svg_with_one_polyline_per_series() -> None:
    root = _parse(render_chart(POINTS, title="metrics"))
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    polylines = root.findall(".//svg:polyline", NS)
    assert len(polylines) == 2
    assert len({p.get("stroke") for p in polylines}) == 2  # distinct colours
    assert len(root.findall(".//svg:circle", NS)) == 6
    legend = root.find("svg:g[@class='legend']", NS)
    assert legend is not None
    assert [t.text for t in legend.findall("svg:text", NS)] == ["loss", "accuracy"]


def test_render_chart_x_axis_has_round_label_and_integer_ticks() -> None:
    root = _parse(render_chart(POINTS))
    ticks = _xticks(root)
    assert "round" in ticks
    nums = [t for t in ticks if t != "round"]
    assert nums == ["1", "2", "3"]


def test_render_chart_escapes_series_names_and_title() -> None:
    svg = render_chart([("<b>&\"x'", 1, 1.0), ("<b>&\"x'", 2, 2.0)], title="a<b>&c")
    assert "<b>" not in svg
    root = _parse(svg)
    texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
    assert "a<b>&c" in texts
    assert "<b>&\"x'" in texts


def test_render_chart_skips_nan_and_inf() -> None:
    pts = [("loss", 1, 1.0), ("loss", 2, math.nan), ("loss", 3, math.inf), ("loss", 4, 0.5)]
    root = _parse(render_chart(pts))
    (poly,) = root.findall(".//svg:polyline", NS)
    assert len((poly.get("points") or "").split()) == 2
    assert "nan" not in render_chart(pts).lower()
    assert len(root.findall(".//svg:circle", NS)) == 2


def test_render_chart_empty_state_text() -> None:
    for pts in ([], [("loss", 1, math.nan)]):
        root = _parse(render_chart(pts))
        texts = [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]
        assert "waiting for the first round…" in texts
        assert root.findall(".//svg:polyline", NS) == []


@pytest.mark.parametrize(
    "values",
    [
        [0.3, 0.9],
        [0.0, 1.0],
        [-3.0, 7.0],
        [0.001, 0.0013],
        [100.0, 12345.0],
        [2.5, 2.5],
        [0.0, 0.0],
        [-0.7, -0.2],
        [0.1, 0.2, 0.3],
        [1e6, 1.0000001e6],
    ],
)
def test_render_chart_y_ticks_cover_data_range(values: list[float]) -> None:
    pts = [("m", i + 1, v) for i, v in enumerate(values)]
    ticks = _yticks(_parse(render_chart(pts)))
    assert 3 <= len(ticks) <= 5
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    span = ticks[-1] - ticks[0]
    assert ticks[0] <= min(values) + 1e-9 * span
    assert ticks[-1] >= max(values) - 1e-9 * span


def test_render_chart_points_stay_inside_plot_area() -> None:
    root = _parse(render_chart(POINTS, width=400, height=200))
    for c in root.findall(".//svg:circle", NS):
        assert 0 <= float(c.get("cx") or -1) <= 400
        assert 0 <= float(c.get("cy") or -1) <= 200


def test_render_chart_is_deterministic_and_respects_size() -> None:
    a = render_chart(POINTS, width=300, height=150)
    assert a == render_chart(list(POINTS), width=300, height=150)
    root = _parse(a)
    assert root.get("width") == "300" and root.get("height") == "150"
    assert "<script" not in a and "<style" not in a


def _table_rows(html: str) -> list[ET.Element]:
    root = ET.fromstring(html)
    assert root.tag == "table"
    body = root.find("tbody")
    assert body is not None
    return body.findall("tr")


def test_render_site_table_columns_and_missing_values() -> None:
    html = render_site_table(
        [
            {
                "site": "a",
                "status": "training",
                "samples": 120,
                "round": 3,
                "detail": "",
                "received_bytes": 400_000_123,
                "device": "cuda:0",
                "gpu_peak_bytes": 1_500_000_000,
                "gpu_seconds": 3.25,
            },
            {"site": "b", "status": "waiting", "samples": None, "round": None, "detail": "", "device": "cpu"},
        ]
    )
    root = ET.fromstring(html)
    headers = ["Site", "Status", "Samples", "Round", "Device", "Traffic", "Detail"]
    assert [th.text for th in root.iter("th")] == headers
    rows = _table_rows(html)
    assert len(rows) == 2
    cells = [td for td in rows[0].findall("td")]
    assert cells[0].text == "a" and cells[2].text == "120" and cells[3].text == "3"
    badge = cells[1].find("span")
    assert badge is not None and badge.text == "training" and "background" in (badge.get("style") or "")
    assert rows[1].findall("td")[2].text == "—"
    assert cells[4].text == "cuda:0 · 1.5 GB peak · 3.2 s" and rows[1].findall("td")[4].text == "cpu"
    assert cells[5].text == "↓ 400.0 MB · ↑ —" and rows[1].findall("td")[5].text == "—"


def test_render_site_table_escapes_and_shows_failed_detail_in_red() -> None:
    html = render_site_table(
        [
            {"site": "<script>x</script>", "status": "failed", "samples": 5, "round": 2, "detail": "boom <&> 'q'"},
            {"site": "ok", "status": "we<ird", "samples": 1, "round": 1, "detail": "fine"},
        ]
    )
    assert "<script>" not in html and "we<ird" not in html
    rows = _table_rows(html)
    cells = rows[0].findall("td")
    assert cells[0].text == "<script>x</script>"
    red = cells[6].find("span")
    assert red is not None and red.text == "boom <&> 'q'"
    assert "color:#cf222e" in (red.get("style") or "")
    assert rows[1].findall("td")[6].find("span") is None  # non-failed detail is plain
    assert rows[1].findall("td")[1].find("span").text == "we<ird"  # type: ignore[union-attr]


def test_render_site_table_empty() -> None:
    rows = _table_rows(render_site_table([]))
    assert len(rows) == 1


@pytest.mark.parametrize(
    "status,colour",
    [("running", "#1f6feb"), ("completed", "#1a7f37"), ("failed", "#cf222e"), ("stopped", "#6e7781")],
)
def test_render_header_colours_status(status: str, colour: str) -> None:
    html = render_header("fedavg", "abc123", status, 3, 15)
    root = ET.fromstring(html)
    assert "".join(root.itertext()) == f"fedavg · run abc123 · {status} · round 3/15"
    span = root.find("span")
    assert span is not None and f"color:{colour}" in (span.get("style") or "")
    assert root.find("b") is not None and root.find("b").text == "fedavg"  # type: ignore[union-attr]


def test_render_header_escapes_and_appends_message() -> None:
    html = render_header("<n>", "r&1", "running", 1, 2, message="site <b> failed")
    assert "<n>" not in html and "<b> failed" not in html
    text = "".join(ET.fromstring(html).itertext())
    assert text == "<n> · run r&1 · running · round 1/2 · site <b> failed"
