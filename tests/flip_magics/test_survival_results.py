"""The notebook's side of survival across sites (issue 29): the hub's answers (a fake hub's, canned) as results,
sentences and figures, read back from their frames and artists; the client's calls, checked before anything is sent."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless, before anything touches pyplot

import math  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from flip_core.errors import RequestInvalid  # noqa: E402
from flip_core.util import free_port  # noqa: E402
from flip_magics.client import FlipClient  # noqa: E402
from flip_magics.figures import png  # noqa: E402
from flip_magics.models import model_from  # noqa: E402
from flip_magics.survival import CURVE_COLUMNS, RISK_TITLE, SurvivalResult, survival_from  # noqa: E402

from fakes import FakeSurvivalConnection, fake_cox_answer, fake_km_answer  # noqa: E402


def one_curve_answer(kept: list[float]) -> dict[str, Any]:
    """A fake hub's single curve (no group): 100 rows, one event and one censoring in each kept bin after the first."""
    n = len(kept)
    at_risk = [100] + [100 - 2 * i for i in range(n - 1)]
    survival = [1.0]
    for k in range(1, n):
        survival.append(survival[-1] * (1 - 1 / at_risk[k]))
    band = {"ci_low": [s - 0.05 for s in survival], "ci_high": [min(1.0, s + 0.05) for s in survival]}
    curve = {"time": kept, "at_risk": at_risk, "events": [0] + [1] * (n - 1), "censored": [0] + [1] * (n - 1),
             "survival": survival, **band}  # fmt: skip
    return fake_km_answer(group=None, edges=kept, kept_edges=kept, curves={"all": curve}, logrank=None,
                          sites={"VA": {"rows": 100, "notes": []}}, refused={}, rows=100)  # fmt: skip


def risk_cells(figure: Figure) -> dict[str, tuple[float, float, str]]:
    """The number-at-risk table under the curves: each cell's (x, row, text) by its ``GROUP@EDGE`` id."""
    (table,) = [a for a in figure.axes if a.get_gid() == RISK_TITLE]
    return {str(t.get_gid()): (*t.get_position(), t.get_text()) for t in table.texts}


def curve_axes(figure: Figure) -> Axes:
    (axes,) = [a for a in figure.axes if a.get_gid() != RISK_TITLE]
    return axes


def test_the_curves_are_a_tidy_table_with_the_numbers_at_risk_by_group_and_edge() -> None:
    result = survival_from(fake_km_answer())
    assert list(result.curves.columns) == CURVE_COLUMNS and len(result.curves) == 6
    a = result.curves[result.curves["group"] == "A"]
    assert list(a["time"]) == [0.0, 60.0, 90.0] and list(a["survival"]) == [1.0, 0.7, 0.45]
    assert list(a["at_risk"]) == [40, 40, 28] and str(a["at_risk"].dtype) == "int64"
    assert result.levels() == ["A", "B"] and result.kept_edges == [0.0, 60.0, 90.0]
    assert result.at_risk().loc["B"].tolist() == [30, 30, 24]
    assert result.sites.to_dict("records") == [{"site": "Hungary", "rows": 38}, {"site": "VA", "rows": 32}]
    assert result.refused == {"Zurich": "Zurich: the dataset fake-trial has no column 'days'"} and result.rows == 70
    assert result.logrank is not None and result.logrank["df"] == 1
    assert result.title() == "Kaplan-Meier: days until died by arm over fake-trial"


def test_the_notes_say_the_merges_the_refusals_the_binning_and_the_log_rank_test() -> None:
    result = survival_from(fake_km_answer())
    assert result.notes[0] == "70 rows at Hungary, VA"
    assert "VA: merged (0, 30] into (30, 60]: fewer than 10 events or censorings there" in result.notes
    assert "Zurich is not in the analysis: Zurich: the dataset fake-trial has no column 'days'" in result.notes
    binned = [n for n in result.notes if n.startswith("no exact time left a site")]
    assert binned == [
        "no exact time left a site: times are binned at the edges 0, 60, 90 (of 0, 30, 60, 90 asked for: the sites' "
        "merges), each taken as the end of its bin; the curve is exact for the binned times"
    ]
    assert result.notes[-1] == (
        "log-rank test across the levels of arm: chi-square 2.948 on 1 df, p = 0.086 (events: A 22 observed, 17.82 "
        "expected; B 10 observed, 14.18 expected)"
    )
    assert "p = 0.086" in repr(result) and "number at risk" in result._repr_html_()
    single = survival_from(one_curve_answer([0.0, 30.0, 60.0]))
    assert single.notes[-1] == "one curve: no log-rank test"
    assert "asked for" not in " ".join(single.notes)  # no site merged a bin


def test_the_figure_draws_steps_from_one_with_the_band_and_no_censoring_marks() -> None:
    figure = survival_from(fake_km_answer()).plot()
    assert isinstance(figure, Figure) and len(figure.axes) == 2
    axes = curve_axes(figure)
    lines = {str(line.get_gid()): line for line in axes.lines}
    assert set(lines) == {"km:A", "km:B"}
    a = lines["km:A"]
    assert a.get_drawstyle() == "steps-post" and a.get_marker() in ("None", "", None)  # no censoring marks
    assert list(a.get_xdata()) == [0.0, 0.0, 60.0, 90.0] and list(a.get_ydata()) == [1.0, 1.0, 0.7, 0.45]
    bands = [c for c in axes.collections if isinstance(c, PolyCollection)]
    assert sorted(str(b.get_gid()) for b in bands) == ["band:A", "band:B"]
    band_b = next(b for b in bands if b.get_gid() == "band:B").get_paths()[0].vertices
    assert band_b[:, 1].min() == pytest.approx(0.4692) and band_b[:, 1].max() == pytest.approx(1.0)
    assert [t.get_text() for t in axes.get_legend().get_texts()] == ["A (n=40)", "B (n=30)"]
    assert "log-rank p = 0.086" in axes.get_title(loc="left") and "not in it: Zurich" in axes.get_title(loc="left")
    assert axes.get_ylim() == (0.0, 1.03) and [t.get_text() for t in axes.get_xticklabels()] == ["0", "60", "90"]
    assert png(figure).startswith(b"\x89PNG")  # static: it renders headless


def test_the_numbers_at_risk_sit_under_the_curves_a_row_per_group_at_each_kept_edge() -> None:
    figure = survival_from(fake_km_answer()).plot()
    cells = risk_cells(figure)
    assert cells == {
        "A@0": (0.0, 0, "40"), "A@60": (60.0, 0, "40"), "A@90": (90.0, 0, "28"),
        "B@0": (0.0, 1, "30"), "B@60": (60.0, 1, "30"), "B@90": (90.0, 1, "24"),
    }  # fmt: skip
    (table,) = [a for a in figure.axes if a.get_gid() == RISK_TITLE]
    assert [t.get_text() for t in table.get_yticklabels()] == ["A", "B"]
    assert table.get_xlim() == curve_axes(figure).get_xlim()  # each number under its edge
    assert table.get_position().y1 <= curve_axes(figure).get_position().y0  # beneath the curves


def test_many_kept_edges_show_the_numbers_at_risk_at_one_edge_in_k() -> None:
    kept = [float(30 * i) for i in range(30)]
    figure = survival_from(one_curve_answer(kept)).plot()
    cells = risk_cells(figure)
    assert sorted(x for x, _, _ in cells.values()) == kept[::3]
    assert cells["all@90"] == (90.0, 0, "96") and curve_axes(figure).get_legend() is None
    (table,) = [a for a in figure.axes if a.get_gid() == RISK_TITLE]
    assert table.get_title(loc="left") == "number at risk (at one kept edge in 3)"


def test_a_cox_answer_gives_hazard_ratios_and_says_how_it_was_fitted() -> None:
    result = model_from(fake_cox_answer())
    table = result.coefficients.set_index("name")
    for name in ("age", "C(arm)[T.B]"):
        assert table.loc[name, "hazard_ratio"] == pytest.approx(math.exp(table.loc[name, "estimate"]))
        assert table.loc[name, "ratio_low"] == pytest.approx(math.exp(table.loc[name, "ci_low"]))
        assert table.loc[name, "ratio_high"] == pytest.approx(math.exp(table.loc[name, "ci_high"]))
    assert result.title() == "Cox model age + C(arm): days until died over fake-trial"
    assert result.notes[0].startswith("fitted over 70 complete rows with 32 events at Hungary, VA")
    assert any("binned at the edges 0, 60, 90" in n and "an approximation, the binning" in n for n in result.notes)
    assert "C(arm): each level against A (the first, as every site sorts them)" in result.notes
    assert "proportional hazards, age: chi-square 0.8 on 1 df, p = 0.371" in result.notes
    assert "proportional hazards, C(arm)[T.B]: chi-square 4.1 on 1 df, p = 0.0429" in result.notes
    assert result.notes[-1].startswith("proportional hazards, global: chi-square 4.6 on 2 df, p = 0.1")


def test_a_stratified_cox_model_says_so_and_why_it_has_no_hazards_check() -> None:
    stratified = model_from(fake_cox_answer(binned=False, hazards_test=None, kept_edges=None))
    assert any(n.startswith("stratified by site (each site its own baseline hazard)") for n in stratified.notes)
    assert not any("binned at the edges" in n for n in stratified.notes)
    assert stratified.notes[-1].startswith("no proportional-hazards check: it is made over binned times (give edges")
    undefined = model_from(fake_cox_answer(hazards_test={"undefined": "too few bins with events"}))
    assert undefined.notes[-1] == "no proportional-hazards check: too few bins with events"


def test_the_hazard_ratios_forest_has_a_log_axis_marked_at_one() -> None:
    figure = model_from(fake_cox_answer()).plot()
    (axes,) = figure.axes
    assert axes.get_xscale() == "log" and axes.get_xlabel() == "hazard ratio (95% CI)"
    assert [t.get_text() for t in axes.get_yticklabels()] == ["age", "C(arm)[T.B]"]
    null = [line for line in axes.lines if line.get_linestyle() == "--"]
    assert [list(line.get_xdata()) for line in null] == [[1.0, 1.0]]
    (marks,) = [line for line in axes.lines if line.get_marker() == "s"]
    assert list(marks.get_xdata()) == pytest.approx([math.exp(0.03), math.exp(-0.5)])


def test_a_glm_answer_is_read_as_before() -> None:
    answer = {"family": "gaussian", "formula": "y ~ age", "dataset": "heart", "rows": 40, "iterations": 1,
              "deviance": 3.0, "scale": 2.5, "sites": {"A": {"rows": 40}},
              "coefficients": [{"name": "age", "estimate": 0.5, "se": 0.1, "z": 5.0, "p": 1e-6, "ci_low": 0.3,
                                "ci_high": 0.7}]}  # fmt: skip
    result = model_from(answer)
    assert "hazard_ratio" not in result.coefficients.columns and result.title() == "gaussian GLM y ~ age over heart"
    assert (
        "iteratively reweighted least squares" in result.notes[0] and "scale (residual variance) 2.5" in result.notes[1]
    )


def test_the_client_sends_the_checked_analysis_and_reads_the_answer() -> None:
    client = FlipClient("http://127.0.0.1:1", "token")
    client.connection = FakeSurvivalConnection()  # type: ignore[assignment]
    result = client.km("fake-trial", "days", "died", [0, 30, 60, 90], group="arm", where="age > 50")
    method, path, body, options = client.connection.sent[-1]  # type: ignore[attr-defined]
    assert (method, path, options) == ("POST", "/api/survival", {"timeout": 300})
    assert body["kind"] == "km" and body["edges"] == [0.0, 30.0, 60.0, 90.0] and body["group"] == "arm"
    assert body["where"] == "age > 50" and body["terms"] == "" and isinstance(result, SurvivalResult)
    model = client.cox("age + C(arm)", "fake-trial", "days", "died", binned=True, edges=[0, 60, 90], sites=["VA"])
    body = client.connection.sent[-1][2]  # type: ignore[attr-defined]
    assert (body["kind"], body["terms"], body["binned"], body["sites"]) == ("cox", "age + C(arm)", True, ["VA"])
    assert body["edges"] == [0.0, 60.0, 90.0] and "hazard_ratio" in model.coefficients.columns


@pytest.mark.parametrize(
    ("call", "said"),
    [
        (lambda c: c.km("trial", "days", "died", [30, 10]), "bin edges increase"),
        (lambda c: c.km("trial", "days", "days", [0, 30]), "the time and the event are two different columns"),
        (lambda c: c.cox("age", "trial", "days", "died", edges=[30]), "survival needs from 2 to 200 bin edges"),
        (lambda c: c.cox("", "trial", "days", "died"), "a Cox model needs terms"),
        (lambda c: c.cox("age + died", "trial", "days", "died"), "the event 'died' is a term of the model too"),
        (lambda c: c.km("trial", "days", "died", [0, 30], where="age >"), "the filter is not valid"),
    ],
)
def test_a_wrong_analysis_is_refused_in_the_kernel_without_reaching_the_hub(call: Any, said: str) -> None:
    nowhere = FlipClient(f"http://127.0.0.1:{free_port()}", "token")  # nothing listens there
    with pytest.raises(RequestInvalid, match=said):
        call(nowhere)
