"""Behaviour tests for flip_magics.widgets.RunWidget."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET

import ipywidgets

from flip_magics.chart import render_chart, render_header, render_site_table, render_summary
from flip_magics.widgets import RunWidget

from fakes import FakeHTMLWidget

POINTS: list[tuple[str, str, float, float]] = [
    ("fit loss", "a", 1, 0.9),
    ("fit loss", "a", 2, 0.5),
    ("evaluate loss", "global", 1, 0.8),
    ("evaluate loss", "global", 2, 0.4),
    ("evaluate loss", "a", 2, 0.45),
]
SITES: list[dict[str, object]] = [
    {"site": "a", "status": "training", "samples": 10, "round": 2, "detail": ""},
]


def test_run_widget_builds_vbox_of_three_html_widgets() -> None:
    w = RunWidget("fedavg", "abc123", 15)
    assert isinstance(w.box, ipywidgets.VBox)
    assert list(w.box.children) == [w.header, w.chart, w.table]
    assert all(isinstance(c, ipywidgets.HTML) for c in w.box.children)
    assert "fedavg" in w.header.value and "round 0/15" in w.header.value
    assert "waiting for the first round" in w.chart.value


def test_run_widget_update_sets_values() -> None:
    w = RunWidget("fedavg", "abc123", 15)
    w.update(status="running", round_=2, points=POINTS, sites=SITES, message="hi <x>")
    assert w.header.value == render_header("fedavg", "abc123", "running", 2, 15, "hi <x>")
    assert w.chart.value == render_chart(POINTS)
    assert w.table.value == render_site_table(SITES)
    root = ET.fromstring(w.chart.value)
    panels = root.findall("{http://www.w3.org/2000/svg}g[@class='panel']")
    assert [p.get("data-metric") for p in panels] == ["evaluate loss", "fit loss"]


def test_run_widget_update_skips_unchanged_assignments() -> None:
    w = RunWidget("fedavg", "abc123", 15)
    header, chart, table = FakeHTMLWidget(), FakeHTMLWidget(), FakeHTMLWidget()
    w.header, w.chart, w.table = header, chart, table  # type: ignore[assignment]
    w.update(status="running", round_=2, points=POINTS, sites=SITES)
    w.update(status="running", round_=2, points=POINTS, sites=SITES)
    assert (len(header.assignments), len(chart.assignments), len(table.assignments)) == (1, 1, 1)
    w.update(status="running", round_=3, points=POINTS, sites=SITES)
    assert (len(header.assignments), len(chart.assignments), len(table.assignments)) == (2, 1, 1)


def test_run_widget_initial_state_not_reassigned() -> None:
    w = RunWidget("fedavg", "abc123", 15)
    chart = FakeHTMLWidget()
    w.chart = chart  # type: ignore[assignment]
    w.update(status="pending", round_=0, points=[], sites=SITES)
    assert chart.assignments == []


def test_run_widget_update_from_background_thread() -> None:
    w = RunWidget("fedavg", "abc123", 3)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            w.update(status="running", round_=i, points=POINTS[: i % 2 + 1], sites=SITES)
        except BaseException as exc:  # pragma: no cover - failure path
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert "round " in w.header.value


def test_run_widget_repr_mimebundle_delegates_to_box() -> None:
    w = RunWidget("fedavg", "abc123", 15)
    bundle = w._repr_mimebundle_()
    assert bundle is not None
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == w.box.model_id


def test_run_widget_static_bundle_holds_the_last_state() -> None:
    w = RunWidget("fedavg", "abc123", 2)
    w.update(status="completed", round_=2, points=POINTS, sites=SITES)
    bundle = w.static_bundle()
    assert set(bundle) == {"text/html", "image/svg+xml", "text/plain"}
    svg = bundle["image/svg+xml"]
    assert svg == render_chart(POINTS) and ET.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    html = bundle["text/html"]
    header = render_header("fedavg", "abc123", "completed", 2, 2)
    summary, table = render_summary(POINTS), render_site_table(SITES)
    assert html.index(header) < html.index(svg) < html.index(summary) < html.index(table)
    assert "final metrics (round 2)" in html and ">0.4<" in html  # global's last evaluate loss
    assert ET.fromstring(html).tag == "div"  # one well-formed fragment
    assert bundle["text/plain"] == "<FLIP run abc123 'fedavg': completed>"
    assert "<script" not in html


def test_run_widget_static_bundle_before_any_metric() -> None:
    w = RunWidget("fedavg", "abc123", 2)
    bundle = w.static_bundle()
    assert "waiting for the first round" in bundle["image/svg+xml"]
    assert "final metrics" not in bundle["text/html"]
    assert bundle["text/plain"] == "<FLIP run abc123 'fedavg': pending>"
