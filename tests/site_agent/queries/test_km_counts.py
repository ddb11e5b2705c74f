"""A site's counts for Kaplan-Meier curves and the log-rank test (``site_agent.queries.survival.km_counts``): per
group its rows and, per kept bin, its events and censorings, every count none or at least the threshold, the merges
said in a sentence; and its refusals, each a sentence holding no number of its data. On real data bundled with
lifelines: the NCCTG lung cancer trial's institutions as sites (228 patients), and ACTG 175 (2139)."""

from __future__ import annotations

import re
from importlib import resources

import numpy as np
import pandas as pd
import pytest
from lifelines.datasets import load_lung, load_rossi

from flip_core.kaplan_meier import ONE_CURVE
from flip_core.survival import EdgesInvalid, bin_index
from site_agent.queries.survival import SurvivalRefused, km_counts

EDGES = [90, 180, 365, 730, 1100]  # days: three months, six, a year, two, three


def institution(number: float) -> pd.DataFrame:
    """One NCCTG institution's patients: ``time`` in days, ``status`` 1 dead, ``sex`` 1 male 2 female."""
    lung = load_lung()
    rows = lung[lung["inst"] == number].reset_index(drop=True)
    return rows.assign(sex=rows["sex"].map({1: "male", 2: "female"}))


def raw_counts(time: np.ndarray, event: np.ndarray, edges: list[float]) -> tuple[np.ndarray, np.ndarray]:
    k, observed = bin_index(time, event, edges)
    return np.bincount(k[observed], minlength=len(edges)), np.bincount(k[~observed], minlength=len(edges))


def released(reply: dict) -> np.ndarray:
    return np.concatenate([np.r_[g["events"], g["censored"]] for g in reply["groups"].values()])


def numbers(sentence: str) -> set[float]:
    return {float(n) for n in re.findall(r"\d+(?:\.\d+)?", sentence)}


@pytest.mark.parametrize(("inst", "threshold"), [(1.0, 3), (12.0, 3), (13.0, 3), (1.0, 5), (12.0, 5)])
def test_an_institutions_counts_are_its_bins_merged_until_every_count_is_safe(inst: float, threshold: int) -> None:
    rows = institution(inst)
    time, event = rows["time"].to_numpy(), rows["status"].to_numpy()
    events, censored = raw_counts(time, event, EDGES)
    assert ((events > 0) & (events < threshold)).any() or ((censored > 0) & (censored < threshold)).any()
    reply = km_counts(time, event, None, EDGES, threshold)
    assert list(reply["groups"]) == [ONE_CURVE]
    counts = reply["groups"][ONE_CURVE]
    assert counts["n"] == len(rows) == sum(counts["events"]) + sum(counts["censored"])
    counted = released(reply)
    assert not ((counted > 0) & (counted < threshold)).any()
    assert reply["edges"][-1] == EDGES[-1] and set(reply["edges"]) | set(reply["dropped"]) == set(map(float, EDGES))
    assert len(reply["notes"]) >= 1 and reply["dropped"]
    # each kept bin holds exactly the rows of the researcher's bins merged into it
    kept = [EDGES.index(e) for e in reply["edges"]]
    starts = [0, *[k + 1 for k in kept[:-1]]]
    assert counts["events"] == [int(events[s : k + 1].sum()) for s, k in zip(starts, kept, strict=True)]
    assert counts["censored"] == [int(censored[s : k + 1].sum()) for s, k in zip(starts, kept, strict=True)]


def test_a_bin_with_a_single_event_is_merged_and_the_sentence_names_it() -> None:
    """Institution 13 at threshold 3: one death in the first three months; [0, 90] is merged into (90, 180]."""
    rows = institution(13.0)
    time, event = rows["time"].to_numpy(), rows["status"].to_numpy()
    events, _ = raw_counts(time, event, EDGES)
    assert events[0] == 1
    reply = km_counts(time, event, None, EDGES, 3)
    assert 90.0 in reply["dropped"] and 90.0 not in reply["edges"]
    assert reply["notes"][0] == "merged [0, 90] into (90, 180]: fewer than 3 events or censorings there"
    assert reply["groups"][ONE_CURVE]["events"][0] == events[0] + events[1]


def test_groups_share_the_sites_kept_edges() -> None:
    """ACTG 175's first 700 patients by sex: one set of edges for both groups, merged over both groups' counts."""
    table = pd.read_csv(resources.files("lifelines") / "datasets" / "ACTG175.csv").iloc[:700]
    sex = np.where(table["gender"] == 1, "male", "female")
    edges, threshold = [90, 180, 360, 540, 720, 900, 1080, 1260], 5
    reply = km_counts(table["days"].to_numpy(), table["cens"].to_numpy(), sex, edges, threshold, ["female", "male"])
    assert list(reply["groups"]) == ["female", "male"]
    assert reply["dropped"]
    for level, counts in reply["groups"].items():
        rows = sex == level
        assert counts["n"] == int(rows.sum())
        assert len(counts["events"]) == len(counts["censored"]) == len(reply["edges"])
        assert sum(counts["events"]) == int(table["cens"].to_numpy()[rows].sum())
    counted = released(reply)
    assert not ((counted > 0) & (counted < threshold)).any()
    # the men's counts alone would have kept an edge the women's small counts dropped
    alone = km_counts(table["days"].to_numpy()[sex == "male"], table["cens"].to_numpy()[sex == "male"], None, edges,
                      threshold)  # fmt: skip
    assert set(alone["edges"]) > set(reply["edges"])


def test_a_numeric_group_is_counted_by_its_level_labels() -> None:
    """Rossi's ``fin`` (financial aid, 0 or 1) as integers and as floats: the levels "0" and "1" either way."""
    rossi = load_rossi()
    week, arrest = rossi["week"].to_numpy(), rossi["arrest"].to_numpy()
    ints = km_counts(week, arrest, rossi["fin"].to_numpy(), [13, 26, 39, 52], 5, ["0", "1"])
    floats = km_counts(week, arrest, rossi["fin"].to_numpy(dtype=float), [13, 26, 39, 52], 5, ["0", "1"])
    assert ints == floats and [g["n"] for g in ints["groups"].values()] == [216, 216]


def test_incomplete_rows_are_left_out_and_late_rows_censored_at_the_last_edge() -> None:
    rows = institution(1.0)
    time, event = rows["time"].to_numpy(dtype=np.float64), rows["status"].to_numpy(dtype=np.float64)
    sex = rows["sex"].to_numpy(dtype=object)
    complete = km_counts(time, event, sex, EDGES, 3, ["female", "male"])
    gaps = (
        np.r_[time, np.nan, 50.0, 60.0, np.inf],
        np.r_[event, 1.0, np.nan, 1.0, 1.0],
        np.concatenate([sex, np.array(["male", "female", None, "male"], dtype=object)]),
    )
    assert km_counts(*gaps, EDGES, 3, ["female", "male"]) == complete
    late = km_counts(time, event, sex, [90, 180, 365], 3, ["female", "male"])
    beyond = time > 365
    assert sum(sum(g["censored"]) for g in late["groups"].values()) == int((beyond | (event == 0)).sum())


REFUSALS = [
    ("too few rows", lambda r: (r["time"], r["status"], None, 30, None), "fewer than 30 complete rows"),
    ("a small group", lambda r: (r["time"], r["status"], r["sex"], 10, ["female", "male"]), "the group 'female'"),
    ("an unnamed level", lambda r: (r["time"], r["status"], r["sex"], 3, ["male"]), "does not name"),
    ("levels not named", lambda r: (r["time"], r["status"], r["sex"], 3, None), "levels named"),
    ("R's 1/2 status", lambda r: (r["time"], r["status"] + 1, None, 3, None), "other than 0 and 1"),
    ("a negative time", lambda r: (r["time"] - 100, r["status"], None, 3, None), "below zero"),
    ("time as text", lambda r: (r["time"].astype(str), r["status"], None, 3, None), "time column is not numeric"),
    ("event as text", lambda r: (r["time"], r["status"].astype(str), None, 3, None), "event column is not numeric"),
    ("no safe bins", lambda r: (r["time"], r["status"], None, 7, None), "none or at least 7"),
]


@pytest.mark.parametrize(("case", "ask", "words"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_a_site_refuses_in_a_sentence_with_no_number_of_its_data(case, ask, words) -> None:
    """Institution 12 (23 patients, 8 women): each refusal says why, naming the threshold or a level, no count."""
    rows = institution(12.0)
    time, event, group, threshold, levels = ask(rows)
    group = None if group is None else group.to_numpy(dtype=object)
    with pytest.raises(SurvivalRefused) as refused:
        km_counts(time.to_numpy(), event.to_numpy(), group, EDGES, threshold, levels)
    sentence = str(refused.value)
    assert words in sentence
    data = {
        len(rows),
        *rows["sex"].value_counts().tolist(),
        int(rows["status"].sum()),
        int((rows["status"] == 0).sum()),
    }
    data |= set(rows["time"].astype(float))
    assert not (numbers(sentence) - {float(threshold)}) & {float(d) for d in data}


def test_edges_that_are_not_increasing_are_refused_before_any_row_is_read() -> None:
    rows = institution(12.0)
    with pytest.raises(EdgesInvalid, match="increase"):
        km_counts(rows["time"].to_numpy(), rows["status"].to_numpy(), None, [180, 90, 365], 3)
