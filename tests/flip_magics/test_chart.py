"""Behaviour tests for flip_magics.chart (pure SVG/HTML renderers)."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from flip_magics.chart import PALETTE, Point, render_chart, render_header, render_site_table, render_summary

NS = {"svg": "http://www.w3.org/2000/svg"}
SVG = "{http://www.w3.org/2000/svg}"


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)


def _panels(root: ET.Element) -> list[ET.Element]:
    return root.findall("svg:g[@class='panel']", NS)


def _panel(root: ET.Element, metric: str) -> ET.Element:
    (panel,) = [p for p in _panels(root) if p.get("data-metric") == metric]
    return panel


def _title(panel: ET.Element) -> str:
    title = panel.find("svg:text[@class='panel-title']", NS)
    assert title is not None
    return title.text or ""


def _yticks(panel: ET.Element) -> list[float]:
    group = panel.find("svg:g[@class='yticks']", NS)
    assert group is not None
    return [float(t.text or "") for t in group.findall("svg:text", NS)]


def _xticks(panel: ET.Element) -> list[str]:
    group = panel.find("svg:g[@class='xticks']", NS)
    assert group is not None
    return [t.text or "" for t in group.findall("svg:text", NS)]


def _polylines(panel: ET.Element) -> dict[str, ET.Element]:
    return {p.get("data-series") or "": p for p in panel.iter(SVG + "polyline")}


def _legend(root: ET.Element) -> list[str]:
    legend = root.find("svg:g[@class='legend']", NS)
    assert legend is not None
    return [t.text or "" for t in legend.findall("svg:text", NS)]


def _ys(el: ET.Element) -> list[float]:
    return [float(v) for t in el.iter() for k in ("y", "y1", "y2", "cy") if (v := t.get(k)) is not None]


POINTS: list[Point] = [
    ("fit loss", "siteB", 1, 0.95),
    ("fit loss", "siteA", 1, 0.9),
    ("fit loss", "siteA", 2, 0.6),
    ("fit loss", "siteB", 2, 0.7),
    ("evaluate accuracy", "global", 1, 0.55),
    ("evaluate accuracy", "global", 2, 0.7),
    ("evaluate accuracy", "global", 3, 0.81),
    ("evaluate accuracy", "siteA", 1, 0.5),
    ("evaluate accuracy", "siteA", 2, 0.66),
    ("evaluate accuracy", "siteA", 3, 0.8),
    ("evaluate accuracy", "siteB", 3, 0.77),
]


def test_render_chart_draws_one_panel_per_metric_in_order() -> None:
    svg = render_chart(POINTS, title="metrics")
    root = _parse(svg)
    assert root.tag == SVG + "svg"
    panels = _panels(root)
    assert [p.get("data-metric") for p in panels] == ["evaluate accuracy", "fit loss"]
    assert [_title(p) for p in panels] == ["evaluate accuracy", "fit loss"]
    texts = [t.text for t in root.iter(SVG + "text")]
    assert texts.count("evaluate accuracy") == 1 and texts.count("fit loss") == 1 and "metrics" in texts
    assert "<script" not in svg and "<style" not in svg


def test_render_chart_one_polyline_per_series_with_finite_data() -> None:
    pts = [*POINTS, ("fit loss", "global", 1, math.nan), ("fit loss", "global", 2, math.inf)]
    root = _parse(render_chart(pts))
    acc, loss = _polylines(_panel(root, "evaluate accuracy")), _polylines(_panel(root, "fit loss"))
    assert sorted(acc) == ["global", "siteA", "siteB"]
    assert sorted(loss) == ["siteA", "siteB"]  # global has no finite fit loss
    assert all(p.get("data-metric") == "fit loss" for p in loss.values())
    assert len((acc["global"].get("points") or "").split()) == 3
    groups = _panel(root, "fit loss").findall("svg:g[@class='series']", NS)
    assert sorted((g.get("data-series"), g.get("data-metric")) for g in groups) == [
        ("siteA", "fit loss"),
        ("siteB", "fit loss"),
    ]


def test_render_chart_site_keeps_its_colour_and_global_is_thick_and_dark() -> None:
    root = _parse(render_chart(POINTS))
    acc, loss = _polylines(_panel(root, "evaluate accuracy")), _polylines(_panel(root, "fit loss"))
    for site in ("siteA", "siteB"):
        assert acc[site].get("stroke") == loss[site].get("stroke")
    assert acc["siteA"].get("stroke") == PALETTE[0] and acc["siteB"].get("stroke") == PALETTE[1]
    assert acc["global"].get("stroke") == "#24292f"
    assert float(acc["global"].get("stroke-width") or 0) > float(acc["siteA"].get("stroke-width") or 9)
    assert acc["global"].get("stroke-width") == "2.5" and loss["siteB"].get("stroke-width") == "1.3"


def test_render_chart_site_colour_does_not_depend_on_which_sites_a_panel_has() -> None:
    # siteA has only fit loss; siteB must keep the colour it has by its place among all sites
    pts: list[Point] = [
        ("fit loss", "siteA", 1, 1.0),
        ("evaluate loss", "siteB", 1, 2.0),
        ("fit loss", "siteB", 1, 1.5),
    ]
    root = _parse(render_chart(pts))
    assert _polylines(_panel(root, "evaluate loss"))["siteB"].get("stroke") == PALETTE[1]
    assert _polylines(_panel(root, "fit loss"))["siteB"].get("stroke") == PALETTE[1]


def test_render_chart_shared_legend_global_first_above_the_panels() -> None:
    root = _parse(render_chart(POINTS, title="metrics"))
    assert _legend(root) == ["global", "siteA", "siteB"]
    legend = root.find("svg:g[@class='legend']", NS)
    assert legend is not None
    assert max(_ys(legend)) < min(y for p in _panels(root) for y in _ys(p))


def test_render_chart_grid_has_two_columns_and_grows_with_rows() -> None:
    def chart(n: int) -> ET.Element:
        return _parse(render_chart([(f"evaluate m{i}", "global", 1, 1.0) for i in range(n)], width=600))

    one, two, three = chart(1), chart(2), chart(3)

    def title_xs(root: ET.Element) -> list[float]:
        return [float(t.get("x") or 0) for p in _panels(root) for t in p.findall("svg:text[@class='panel-title']", NS)]

    assert title_xs(one) == [300.0]
    assert title_xs(three) == [150.0, 450.0, 150.0]
    assert float(one.get("height") or 0) == float(two.get("height") or 0)
    assert float(three.get("height") or 0) - float(two.get("height") or 0) == 190
    assert one.get("width") == "600" and one.get("viewBox") == f"0 0 600 {one.get('height')}"


def test_render_chart_x_axis_has_round_label_and_integer_ticks() -> None:
    root = _parse(render_chart(POINTS))
    for panel in _panels(root):
        ticks = _xticks(panel)
        assert "round" in ticks
        assert [t for t in ticks if t != "round"] == ["1", "2", "3"]  # rounds are shared by the panels


def test_render_chart_escapes_metric_and_series_names_and_title() -> None:
    odd = "<b>&\"x'"
    svg = render_chart([(odd, odd, 1, 1.0), (odd, odd, 2, 2.0)], title="a<b>&c")
    assert "<b>" not in svg
    root = _parse(svg)
    texts = [t.text for t in root.iter(SVG + "text")]
    assert "a<b>&c" in texts
    (panel,) = _panels(root)
    assert panel.get("data-metric") == odd and _title(panel) == odd
    assert list(_polylines(panel)) == [odd] and _polylines(panel)[odd].get("data-metric") == odd
    assert _legend(root) == [odd]


def test_render_chart_skips_nan_and_inf_and_metrics_without_finite_points() -> None:
    pts = [
        ("fit loss", "global", 1, 1.0),
        ("fit loss", "global", 2, math.nan),
        ("fit loss", "global", 3, math.inf),
        ("fit loss", "global", 4, 0.5),
        ("fit loss", "global", math.nan, 0.7),
        ("evaluate auc", "global", 1, math.nan),
        ("evaluate auc", "siteA", 2, -math.inf),
    ]
    svg = render_chart(pts)
    root = _parse(svg)
    (panel,) = _panels(root)
    assert panel.get("data-metric") == "fit loss"
    (poly,) = panel.iter(SVG + "polyline")
    assert len((poly.get("points") or "").split()) == 2
    assert len(list(panel.iter(SVG + "circle"))) == 2
    assert "nan" not in svg.lower() and "inf" not in svg.lower()
    assert _legend(root) == ["global"]  # siteA has no finite point at all


def test_render_chart_single_point_series_is_visible() -> None:
    root = _parse(render_chart([("evaluate loss", "siteA", 4, 0.3), ("evaluate loss", "global", 4, 0.25)]))
    (panel,) = _panels(root)
    for group in panel.findall("svg:g[@class='series']", NS):
        assert len(group.findall("svg:circle", NS)) == 1
    assert [t for t in _xticks(panel) if t != "round"] == ["3", "4", "5"]


def test_render_chart_empty_state_text() -> None:
    empty: list[list[Point]] = [[], [("fit loss", "global", 1, math.nan)]]
    for pts in empty:
        root = _parse(render_chart(pts))
        texts = [t.text for t in root.iter(SVG + "text")]
        assert "waiting for the first round…" in texts
        assert root.findall(".//svg:polyline", NS) == [] and _panels(root) == []


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
    pts: list[Point] = [("fit loss", "siteA", 1, 1e9)]  # a far larger other panel must not change this one's axis
    pts += [("evaluate m", "global" if i % 2 else "siteA", i + 1, v) for i, v in enumerate(values)]
    ticks = _yticks(_panel(_parse(render_chart(pts)), "evaluate m"))
    assert 3 <= len(ticks) <= 5
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)
    span = ticks[-1] - ticks[0]
    assert ticks[0] <= min(values) + 1e-9 * span
    assert ticks[-1] >= max(values) - 1e-9 * span


def test_render_chart_points_stay_inside_the_svg() -> None:
    root = _parse(render_chart(POINTS, width=400, panel_height=150))
    width, height = float(root.get("width") or 0), float(root.get("height") or 0)
    assert width == 400 and height >= 150
    for c in root.iter(SVG + "circle"):
        assert 0 <= float(c.get("cx") or -1) <= width
        assert 0 <= float(c.get("cy") or -1) <= height


def test_render_chart_is_deterministic_whatever_the_input_order() -> None:
    a = render_chart(POINTS, width=300, panel_height=150)
    assert a == render_chart(list(POINTS), width=300, panel_height=150)
    assert a == render_chart(list(reversed(POINTS)), width=300, panel_height=150)


def _summary(html: str) -> tuple[str, list[str], list[list[str]]]:
    root = ET.fromstring(html)
    assert root.tag == "table"
    caption = root.find("caption")
    assert caption is not None
    headers = [th.text or "" for th in root.iter("th")]
    body = root.find("tbody")
    assert body is not None
    return caption.text or "", headers, [[td.text or "" for td in tr.findall("td")] for tr in body.findall("tr")]


def test_render_summary_has_the_last_value_per_series_and_metric() -> None:
    pts = [*POINTS, ("fit loss", "siteA", 3, math.nan), ("evaluate accuracy", "global", 3, 0.812345)]
    caption, headers, rows = _summary(render_summary(pts))
    assert caption == "final metrics (round 3)"
    assert headers == ["Series", "evaluate accuracy", "fit loss"]
    assert rows == [
        ["global", "0.8123", "—"],  # the later of two values for round 3, 4 significant digits
        ["siteA", "0.8", "0.6"],  # round 3's NaN fit loss is skipped
        ["siteB", "0.77", "0.7"],
    ]
    assert "style=" in render_summary(pts) and "<style" not in render_summary(pts)


def test_render_summary_rounds_escaping_and_empty() -> None:
    odd = "<i>&'\""
    html = render_summary([(odd, odd, 2, 12345.678), (odd, "global", 1, 1.0)], rounds=5)
    assert "<i>&" not in html
    caption, headers, rows = _summary(html)
    assert caption == "final metrics (round 5)"
    assert headers == ["Series", odd]
    assert rows == [["global", "1"], [odd, "1.235e+04"]]
    caption, headers, rows = _summary(render_summary([]))
    assert caption == "final metrics (round 0)" and headers == ["Series"] and len(rows) == 1


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
