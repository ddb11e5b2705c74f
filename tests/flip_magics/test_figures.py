"""Behaviour tests for flip_magics.figures: a query's answer as a matplotlib figure, read back from its artists."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless, before anything touches pyplot

import math  # noqa: E402
from io import BytesIO  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle, StepPatch  # noqa: E402

from flip_magics import figures  # noqa: E402
from flip_magics.queries import QueryResult, result_from  # noqa: E402

EDGES = [0.0, 10.0, 20.0, 30.0]
HIST_LEVELS = ["below 0", "[0, 10)", "[10, 20)", "[20, 30]", "above 30", "(missing)"]
QUANTILES = {"p5": 1.0, "p25": 2.0, "p50": 3.0, "p75": 4.0, "p95": 5.0}


def answer(kind: str, sites: dict[str, dict[str, Any]], pooled: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    """The coordinator's answer (``coordinator.queries.answer_view``) around hand-written tables."""
    return {
        "query_id": "abc123",
        "dataset": "heart",
        "kind": kind,
        "columns": extra.pop("columns", []),
        "where": extra.pop("where", ""),
        "text": f"heart {kind}",
        "sites": {name: {"threshold": 10, "table": table} for name, table in sites.items()},
        "refused": extra.pop("refused", {}),
        "pooled": pooled,
        **extra,
    }


def counts(dims: list[str], levels: list[list[str]], cells: list[int | None], **extra: Any) -> dict[str, Any]:
    total = None if None in cells else sum(c for c in cells if c is not None)
    return {"dims": dims, "levels": levels, "cells": cells, "total": total, **extra}


def pooled_counts(dims: list[str], levels: list[list[str]], sites: dict[str, list[int | None]]) -> dict[str, Any]:
    """The pooled table as ``coordinator.pooling`` makes it (every site lists the same levels here)."""
    names = list(sites)
    columns = list(zip(*sites.values(), strict=True))
    withheld_by = [[n for n, c in zip(names, cells, strict=True) if c is None] for cells in columns]
    cells = [
        None if who else sum(c for c in col if c is not None) for col, who in zip(columns, withheld_by, strict=True)
    ]
    return {**counts(dims, levels, cells), "withheld_by": withheld_by, "sites": names}


def count_result(mock: bool = False) -> QueryResult:
    levels = [["1", "2", "3"]]
    cells: dict[str, list[int | None]] = {"alpha": [40, None, 25], "beta": [30, 12, 18]}
    sites = {name: counts(["cp"], levels, c) for name, c in cells.items()}
    return result_from(answer("count", sites, pooled_counts(["cp"], levels, cells), columns=["cp"]), mock=mock)


def hist_result() -> QueryResult:
    levels = [HIST_LEVELS]
    cells: dict[str, list[int | None]] = {"alpha": [3, 20, None, 15, 0, 4], "beta": [None, 11, 30, 14, 2, 0]}
    sites = {name: counts(["age"], levels, c, edges=EDGES) for name, c in cells.items()}
    pooled = {**pooled_counts(["age"], levels, cells), "edges": EDGES}
    return result_from(answer("hist", sites, pooled, columns=["age"]))


def crosstab_result(kind: str = "crosstab") -> QueryResult:
    levels = [["F", "M"], ["0", "1", "2"]]
    cells: dict[str, list[int | None]] = {"alpha": [12, None, 20, 30, 11, 14], "beta": [15, 16, 17, 18, 19, 21]}
    sites = {name: counts(["sex", "cp"], levels, c) for name, c in cells.items()}
    return result_from(answer(kind, sites, pooled_counts(["sex", "cp"], levels, cells), columns=["sex", "cp"]))


def column_stats(n: int | None, quantiles: dict[str, float] | None, mean: float | None = 3.0) -> dict[str, Any]:
    sketch = None if quantiles is None else [[mean, n]]
    return {
        "n": n,
        "missing": None if n is None else 2,
        "mean": mean,
        "std": 1.0,
        "quantiles": quantiles,
        "sketch": sketch,
    }


def stats_result() -> QueryResult:
    shifted = {k: v + 10 for k, v in QUANTILES.items()}
    sites = {
        "alpha": {"columns": {"age": column_stats(50, QUANTILES), "chol": column_stats(None, None, None)}, "total": 52},
        "beta": {
            "columns": {"age": column_stats(40, shifted, 13.0), "chol": column_stats(40, shifted, 13.0)},
            "total": 42,
        },
    }
    pooled_age = {**column_stats(90, {k: v + 4 for k, v in QUANTILES.items()}, 7.4), "approximate": ["quantiles"]}
    pooled_chol = {**column_stats(None, None, None), "approximate": ["quantiles"], "withheld_by": {"n": ["alpha"]}}
    pooled = {"columns": {"age": pooled_age, "chol": pooled_chol}, "total": 94, "sites": ["alpha", "beta"]}
    return result_from(answer("stats", sites, pooled, columns=["age", "chol"]))


def missing_result() -> QueryResult:
    levels = [["age", "chol"], ["missing", "present"]]
    cells: dict[str, list[int | None]] = {"alpha": [None, 48, 12, 38], "beta": [3, 39, 15, 27]}
    sites = {name: counts(["column", "state"], levels, c) for name, c in cells.items()}
    return result_from(answer("missing", sites, pooled_counts(["column", "state"], levels, cells)))


def cohort_result() -> QueryResult:
    cells: dict[str, list[int | None]] = {"alpha": [120], "beta": [80]}
    sites = {name: {**counts([], [], c), "cohort": "older", "hash": f"h-{name}"} for name, c in cells.items()}
    return result_from(answer("cohort", sites, pooled_counts([], [], cells), where="age > 60"))


ALL_KINDS = {
    "count": count_result,
    "hist": hist_result,
    "crosstab": crosstab_result,
    "stats": stats_result,
    "missing": missing_result,
    "cohort": cohort_result,
}


def only_axes(fig: Figure) -> Axes:
    assert len(fig.axes) == 1
    return fig.axes[0]


def bars(ax: Axes) -> dict[str, dict[str, float]]:
    """Each series' bar heights by the x tick label nearest its bar's centre."""
    ticks = {
        round(float(t), 6): label.get_text() for t, label in zip(ax.get_xticks(), ax.get_xticklabels(), strict=True)
    }
    out: dict[str, dict[str, float]] = {}
    for container in ax.containers:
        if container.get_label() == figures.PERTURBED_LABEL:  # error bars of perturbed counts
            continue
        assert isinstance(container, BarContainer)
        heights = out.setdefault(str(container.get_label()), {})
        for patch in container.patches:
            centre = patch.get_x() + patch.get_width() / 2
            nearest = min(ticks, key=lambda t: abs(t - centre))
            heights[ticks[nearest]] = patch.get_height()
    return out


def withheld_marks(ax: Axes) -> list[tuple[float, float]]:
    points: list[tuple[float, float]] = []
    for line in ax.lines:
        if line.get_gid() == figures.WITHHELD_LABEL:
            xs, ys = np.asarray(line.get_xdata(), dtype=float), np.asarray(line.get_ydata(), dtype=float)
            points += list(zip(xs.tolist(), ys.tolist(), strict=True))
    return points


def caption(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.texts if t.get_gid() == "caption")


# -- bars ----------------------------------------------------------------------------------------


def test_count_bars_are_the_released_counts_and_a_withheld_cell_has_only_a_mark() -> None:
    fig = figures.plot(count_result())
    ax = only_axes(fig)
    assert bars(ax) == {"alpha": {"1": 40, "3": 25}, "beta": {"1": 30, "2": 12, "3": 18}}
    marks = withheld_marks(ax)
    assert len(marks) == 1 and marks[0][1] == 0.0
    alpha = ax.containers[0]
    assert isinstance(alpha, BarContainer)
    assert all(p.get_x() + p.get_width() / 2 != pytest.approx(marks[0][0]) for p in alpha.patches)
    assert marks[0][0] == pytest.approx(1 - 0.2)  # alpha's slot in the level "2" group
    assert figures.WITHHELD_CAPTION in caption(fig)
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["alpha", "beta", "withheld"]


def perturbed_count_result() -> QueryResult:
    """alpha moves its counts by at most 2, beta by at most 3 (cell-key perturbation)."""
    levels = [["1", "2", "3"]]
    cells: dict[str, list[int | None]] = {"alpha": [40, None, 25], "beta": [30, 12, 18]}
    sites = {name: counts(["cp"], levels, c, noise=d) for (name, c), d in zip(cells.items(), (2, 3), strict=True)}
    pooled = {**pooled_counts(["cp"], levels, cells), "noise": [5, 0, 5]}
    return result_from(answer("count", sites, pooled, columns=["cp"]))


def test_perturbed_counts_say_by_how_much_beside_each_value_and_in_error_bars() -> None:
    result = perturbed_count_result()
    assert result.sites["noise"].tolist() == [2, pd.NA, 2, 3, 3, 3]  # withheld: no noise to speak of
    assert result.pooled["noise"].tolist() == [5, pd.NA, 5]
    assert any("perturbed by at most" in note and "alpha 2, beta 3" in note for note in result.notes)
    fig = figures.plot(result)
    ax = only_axes(fig)
    moved = [c for c in ax.containers if c.get_label() == figures.PERTURBED_LABEL]
    assert len(moved) == 2  # one set of error bars per site, on its released bars only
    segments = [seg for c in moved for seg in c.lines[2][0].get_segments()]
    assert sorted(round(float(seg[1][1] - seg[0][1]), 6) for seg in segments) == [4, 4, 6, 6, 6]  # 2 × ±2, 3 × ±3
    assert "counts are perturbed: each site's by at most ±3" in caption(fig).replace("\n", " ")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["alpha", "beta", "withheld"]
    plain = figures.plot(count_result())
    assert "perturbed" not in caption(plain) and not any(c.get_label() == figures.PERTURBED_LABEL for c in
                                                         only_axes(plain).containers)  # fmt: skip


def test_count_bars_pooled_are_one_series_and_the_withheld_pooled_cell_is_marked() -> None:
    ax = only_axes(figures.plot(count_result(), pooled=True))
    assert bars(ax) == {"pooled": {"1": 70, "3": 43}}
    assert [x for x, _ in withheld_marks(ax)] == [pytest.approx(1.0)]


def test_a_count_without_withheld_values_has_no_withheld_caption_or_mark() -> None:
    result = cohort_result()
    fig = figures.plot(result)
    ax = only_axes(fig)
    assert bars(ax) == {"alpha": {"cohort": 120}, "beta": {"cohort": 80}}
    assert withheld_marks(ax) == []
    assert figures.WITHHELD_CAPTION not in caption(fig)
    assert bars(only_axes(figures.plot(result, pooled=True))) == {"pooled": {"cohort": 200}}


def test_missing_bars_count_the_missing_values_per_column() -> None:
    ax = only_axes(figures.plot(missing_result()))
    assert bars(ax) == {"alpha": {"chol": 12}, "beta": {"age": 3, "chol": 15}}
    assert len(withheld_marks(ax)) == 1
    assert ax.get_ylabel() == "rows missing"


def test_many_levels_are_rotated() -> None:
    levels = [[str(i) for i in range(9)]]
    cells: dict[str, list[int | None]] = {"alpha": list(range(10, 19))}
    sites = {"alpha": counts(["age"], levels, cells["alpha"])}
    ax = only_axes(figures.plot(result_from(answer("count", sites, pooled_counts(["age"], levels, cells)))))
    assert {label.get_rotation() for label in ax.get_xticklabels()} == {45.0}
    assert {label.get_rotation() for label in only_axes(figures.plot(count_result())).get_xticklabels()} == {0.0}


# -- hist ------------------------------------------------------------------------------------------


def steps(ax: Axes) -> dict[str, StepPatch]:
    return {str(p.get_label()).split(" ")[0]: p for p in ax.patches if isinstance(p, StepPatch)}


def heights(step: StepPatch) -> np.ndarray[Any, Any]:
    values, _, _ = step.get_data()
    return np.asarray(values, dtype=float)


def test_hist_steps_are_the_released_bin_counts_over_the_edges() -> None:
    fig = figures.plot(hist_result())
    ax = only_axes(fig)
    drawn = steps(ax)
    assert sorted(drawn) == ["alpha", "beta"]
    _, alpha_edges, _ = drawn["alpha"].get_data()
    np.testing.assert_array_equal(alpha_edges, EDGES)
    np.testing.assert_array_equal(heights(drawn["alpha"]), [20, math.nan, 15])
    np.testing.assert_array_equal(heights(drawn["beta"]), [11, 30, 14])
    bands = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_gid() == figures.WITHHELD_LABEL]
    assert [(b.get_x(), b.get_x() + b.get_width()) for b in bands] == [(10.0, 20.0)]
    assert bands[0].get_hatch()
    assert figures.WITHHELD_CAPTION in caption(fig)


def test_hist_lists_below_above_and_missing_in_the_legend_not_as_bins() -> None:
    ax = only_axes(figures.plot(hist_result()))
    legend = ax.get_legend()
    assert legend is not None
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts[0] == "alpha (below 0: 3; above 30: 0; missing: 4)"
    assert texts[1] == "beta (below 0: withheld; above 30: 2; missing: 0)"
    assert all(len(heights(p)) == len(EDGES) - 1 for p in steps(ax).values())


def test_hist_keeps_its_width_and_marks_a_withheld_bin_low_on_its_baseline() -> None:
    """The legend's long labels go under the plot, and a withheld bin's band stays low: the released bins stay in
    view (the cohort notebook's histogram was once a narrow strip beside its legend, hatched over its range)."""
    fig = figures.plot(hist_result())
    figures.png(fig, dpi=50)  # laid out as shown
    ax = only_axes(fig)
    assert ax.get_position().width > 0.7
    (band,) = [p for p in ax.patches if isinstance(p, Rectangle) and p.get_gid() == figures.WITHHELD_LABEL]
    assert band.get_y() == 0.0 and band.get_height() <= 0.1 * ax.get_ylim()[1]


def test_hist_pooled_is_one_step_with_the_withheld_bin_left_out() -> None:
    drawn = steps(only_axes(figures.plot(hist_result(), pooled=True)))
    assert list(drawn) == ["pooled"]
    np.testing.assert_array_equal(heights(drawn["pooled"]), [31, math.nan, 29])


# -- heat maps --------------------------------------------------------------------------------------


def heat_axes(fig: Figure) -> list[Axes]:
    return [ax for ax in fig.axes if ax.images]


def test_crosstab_is_a_pooled_heat_map_with_withheld_cells_masked_and_annotated() -> None:
    fig = figures.plot(crosstab_result())
    (ax,) = heat_axes(fig)
    shown = ax.images[0].get_array()
    assert isinstance(shown, np.ma.MaskedArray)
    np.testing.assert_array_equal(shown.filled(math.nan), [[27, math.nan, 37], [48, 30, 35]])
    assert shown.mask.tolist() == [[False, True, False], [False, False, False]]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["27", "withheld", "37", "48", "30", "35"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["F", "M"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("cp", "sex")
    assert figures.WITHHELD_CAPTION in caption(fig)


def test_crosstab_by_site_is_one_heat_map_per_site() -> None:
    fig = figures.plot(crosstab_result(), pooled=False)
    panels = heat_axes(fig)
    assert [ax.get_title() for ax in panels] == ["alpha", "beta"]
    alpha = panels[0].images[0].get_array()
    assert isinstance(alpha, np.ma.MaskedArray)
    np.testing.assert_array_equal(alpha.filled(math.nan), [[12, math.nan, 20], [30, 11, 14]])
    assert "withheld" in [t.get_text() for t in panels[0].texts]
    assert "withheld" not in [t.get_text() for t in panels[1].texts]


def test_a_count_by_two_columns_is_heat_maps_by_site_unless_pooled() -> None:
    assert len(heat_axes(figures.plot(crosstab_result("count")))) == 2
    assert len(heat_axes(figures.plot(crosstab_result("count"), pooled=True))) == 1


def test_heat_maps_by_site_stop_at_eight_panels() -> None:
    levels = [["F", "M"], ["0", "1"]]
    cells: dict[str, list[int | None]] = {f"site{i:02d}": [10 + i, 11, 12, 13] for i in range(10)}
    sites = {name: counts(["sex", "cp"], levels, c) for name, c in cells.items()}
    result = result_from(answer("crosstab", sites, pooled_counts(["sex", "cp"], levels, cells)))
    fig = figures.plot(result, pooled=False)
    assert len(heat_axes(fig)) == figures.MAX_SITE_PANELS
    assert "showing 8 of 10 sites" in caption(fig)


# -- stats ----------------------------------------------------------------------------------------


def gid_artists(ax: Axes, gid: str) -> list[Any]:
    return [a for a in [*ax.lines, *ax.patches] if a.get_gid() == gid]


def test_stats_glyphs_span_p5_to_p95_with_the_box_over_the_quartiles() -> None:
    fig = figures.plot(stats_result())
    age, chol = fig.axes[:2]
    assert (age.get_title(), chol.get_title()) == ("age", "chol")
    (whisker,) = gid_artists(age, "whisker:alpha")
    assert list(whisker.get_ydata()) == [1.0, 5.0]
    (box,) = gid_artists(age, "box:alpha")
    assert (box.get_y(), box.get_y() + box.get_height()) == (2.0, 4.0)
    (median,) = gid_artists(age, "median:alpha")
    assert list(median.get_ydata()) == [3.0, 3.0]
    assert list(gid_artists(age, "whisker:beta")[0].get_ydata()) == [11.0, 15.0]
    (pooled,) = gid_artists(age, "whisker:pooled")
    assert list(pooled.get_ydata()) == [5.0, 9.0]
    assert gid_artists(age, "box:pooled")[0].get_hatch()
    labels = [t.get_text() for t in age.get_xticklabels()]
    assert labels == ["alpha\nn=50", "beta\nn=40", "pooled\nn=90"]


def test_stats_withheld_quantiles_have_a_mark_and_no_glyph() -> None:
    fig = figures.plot(stats_result())
    chol = fig.axes[1]
    assert gid_artists(chol, "whisker:alpha") == [] and gid_artists(chol, "box:alpha") == []
    assert len(gid_artists(chol, f"{figures.WITHHELD_LABEL}:alpha")) == 1
    assert len(gid_artists(chol, f"{figures.WITHHELD_LABEL}:pooled")) == 1
    assert len(gid_artists(chol, "whisker:beta")) == 1
    assert "alpha\nn=withheld" in [t.get_text() for t in chol.get_xticklabels()]
    assert figures.WITHHELD_CAPTION in caption(fig)
    legend_texts = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert legend_texts[:3] == ["alpha", "beta", "pooled"]


def test_stats_pooled_shows_only_the_pooled_glyph() -> None:
    age = figures.plot(stats_result(), pooled=True).axes[0]
    assert [a.get_gid() for a in age.lines if str(a.get_gid()).startswith("whisker")] == ["whisker:pooled"]


# -- every figure --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_every_kind_renders_to_png_with_the_result_title(kind: str) -> None:
    result = ALL_KINDS[kind]()
    for pooled in (False, True):
        fig = figures.plot(result, pooled=pooled)
        assert isinstance(fig, Figure)
        assert fig.get_suptitle() == result.title()
        buffer = BytesIO()
        fig.savefig(buffer, format="png")
        assert buffer.getvalue().startswith(b"\x89PNG")
        assert not [t for t in fig.texts if t.get_text() == "MOCK"]


@pytest.mark.parametrize("kind", list(ALL_KINDS))
def test_a_mock_result_has_a_mock_title_and_a_watermark(kind: str) -> None:
    result = ALL_KINDS[kind]()
    result.mock = True
    fig = figures.plot(result)
    assert fig.get_suptitle().startswith("MOCK")
    (mark,) = [t for t in fig.texts if t.get_text() == "MOCK"]
    alpha = mark.get_alpha()
    assert alpha is not None and 0 < alpha < 0.5
    assert mark.get_rotation() != 0
    assert float(mark.get_fontsize()) >= 48
    fig.savefig(BytesIO(), format="png")


def test_a_result_no_site_answered_is_a_figure_that_says_so() -> None:
    result = result_from(answer("count", {}, None, refused={"alpha": "offline"}, columns=["cp"]))
    fig = figures.plot(result)
    assert fig.get_suptitle() == result.title()
    texts = [t.get_text() for t in fig.texts]
    assert "no site released an answer" in texts
    assert "not shown (did not answer): alpha" in caption(fig)
    fig.savefig(BytesIO(), format="png")


def test_png_is_the_figure_as_png_bytes() -> None:
    data = figures.png(figures.plot(hist_result()), dpi=50)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (350, 200)  # 7 x 4 inches at 50 dpi


def test_figures_are_independent_of_each_other() -> None:
    first = figures.plot(count_result())
    second = figures.plot(count_result(mock=True))
    assert first is not second
    assert not [t for t in first.texts if t.get_text() == "MOCK"]
    assert len(first.axes) == 1 and len(second.axes) == 1
