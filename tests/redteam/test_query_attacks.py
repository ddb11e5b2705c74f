"""Statistics that survive a determined researcher: the red team's attacks on the query path (issue 26).

Each attack uses only what a researcher has (queries, cohorts and mocks through the public client) against the
shared red-team federation, computes what it was after (a count under the site's threshold, one patient's value,
a site's extreme) from what came back, and is judged against the truth, read with pandas from the site's own
table: every attack must come back with nothing to compute it from. The attacks are those of the classes the
issue lists (differencing, combinations of three, histograms, complements, padding, quantiles, mocks); each picks
its target in the site's data first, so that what it would recover is truly small.

The module asks as one researcher of one project, in one federation: the ledger of each site sees every attack,
so the attacks run after each other, as a hostile researcher's would.
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from coordinator.config import add_token
from flip_magics.client import FlipClient
from site_agent.data.catalog import load_site
from site_agent.data.formats import load_table

from kit import SECOND_PROJECT, SITES, RedTeam

pytestmark = pytest.mark.integration

DATASET = "heart-disease"
T = 10  # the red team's sites keep the default threshold
SITE = SITES[0]  # each attack aims at the first hospital (Cleveland); its answers from the others are asked too


@pytest.fixture(scope="module")
def truth(redteam: RedTeam) -> pd.DataFrame:
    """The attacked site's table, as the site reads it (the ground truth no answer may give away)."""
    return load_table(load_site(Path(redteam.sites_dir) / SITE), DATASET)


def ask(
    client: FlipClient, kind: str, columns: tuple[str, ...] = (), where: str = "", site: str = SITE, **options: Any
) -> dict | None:
    """The attacked site's released table for a query, or None where it refused."""
    answer = client.query(DATASET, kind, list(columns), where, **options).raw
    reply = answer["sites"].get(site)
    return None if reply is None else reply["table"]


def cell(table: dict | None, **levels: str) -> int | None:
    """A count table's cell by its levels (``sex="1"``), or its total with no levels; None where withheld."""
    if table is None:
        return None
    if not levels:
        return table["total"]
    if any(levels[name] not in table["levels"][d] for d, name in enumerate(table["dims"])):
        return None  # a value too few patients hold to be named: nothing told of it
    index = [table["levels"][d].index(levels[name]) for d, name in enumerate(table["dims"])]
    return table["cells"][int(np.ravel_multi_index(index, [len(lv) for lv in table["levels"]]))]


def minus(*counts: int | None, plus: tuple[int | None, ...] = ()) -> int | None:
    """``counts[0] - counts[1] - ... + plus...``: what an attack computes, None if any part was withheld."""
    if any(c is None for c in (*counts, *plus)):
        return None
    return int(counts[0]) - sum(int(c) for c in counts[1:]) + sum(int(c) for c in plus)  # type: ignore[arg-type]


def small(n: int) -> bool:
    return 0 < n < T


def overlapping(table: pd.DataFrame, rows: pd.Series) -> str:
    """A group (``column > cut``) that shares few of ``rows`` (1 to T - 1), with at least T of its own and T of
    ``rows`` outside it: no two of the group, ``rows`` and their union are within T of each other."""
    for column in ("age", "thalach", "trestbps", "oldpeak", "chol"):
        for cut in np.unique(table[column].dropna().to_numpy()):
            group = table[column] > cut
            if small(int((group & rows).sum())) and (group & ~rows).sum() >= T and (rows & ~group).sum() >= T:
                return f"{column} > {cut:g}"
    raise AssertionError("no group overlaps those rows by a few")


def one_patient(table: pd.DataFrame, among: pd.Series) -> str:
    """A filter that picks exactly one patient of ``among`` (rows of ``table``) by values of theirs."""
    return picked(table, among)[0]


def picked(table: pd.DataFrame, among: pd.Series) -> tuple[str, pd.Series]:
    """:func:`one_patient`'s filter and the patient's row (the truth an attack is judged against)."""
    for _, row in table[among].iterrows():
        if pd.isna(row.chol) or pd.isna(row.thalach):
            continue
        where = f"age = {row.age:g} and chol = {row.chol:g} and thalach = {row.thalach:g}"
        if ((table.age == row.age) & (table.chol == row.chol) & (table.thalach == row.thalach)).sum() == 1:
            return where, row
    raise AssertionError("no patient picked out by age, chol and thalach")


def test_a_released_count_by_cell_less_a_filtered_count_of_its_rows_but_one(redteam, truth) -> None:
    """Differencing: a ``count by sex`` cell and a count of the same rows less one patient."""
    client = redteam.client()
    target = one_patient(truth, (truth.age > 40) & (truth.sex == 1))
    by_sex = ask(client, "count", ("sex",), "age > 40")
    rest = ask(client, "count", (), f"age > 40 and sex = 1 and not ({target})")
    assert minus(cell(by_sex, sex="1"), cell(rest)) is None  # it would be 1: the patient is a man over 40
    assert cell(by_sex, sex="1") == int(((truth.age > 40) & (truth.sex == 1)).sum())  # the honest cell leaves


def test_two_cohorts_exactly_the_threshold_apart_counted_by_sex(redteam, truth) -> None:
    """The rows between two cohorts are T (allowed), but how many of them are women is small."""
    client = redteam.client()
    older = truth[truth.age > 45]
    cut = np.sort(older.chol.dropna().to_numpy())[-T]  # the T highest chol of the cohort (no ties at the cut here)
    removed = older[older.chol >= cut]
    assert len(removed) == T and small(int((removed.sex == 0).sum()))
    wide = ask(client, "count", ("sex",), "age > 45")
    narrow = ask(client, "count", ("sex",), f"age > 45 and chol < {cut:g}")
    assert minus(cell(wide, sex="0"), cell(narrow, sex="0")) is None


def test_a_one_bin_histogram_and_its_bin_joined_to_another_group(redteam, truth) -> None:
    """A one-bin histogram's bin, a group's count, and the count of the two together: their overlap."""
    client = redteam.client()
    low, high = 200, 300  # a wide bin, released (its below and above cells are smaller)
    in_bin = truth.chol.between(low, high)
    other = overlapping(truth, in_bin)
    hist = ask(client, "hist", ("chol",), bins=1, range=(low, high))
    assert hist is not None and hist["cells"][1] == int(in_bin.sum())
    group = ask(client, "count", (), other)
    both = ask(client, "count", (), f"chol between {low} and {high} or {other}")
    assert minus(hist["cells"][1], cell(both), plus=(cell(group),)) is None


def test_two_one_bin_histograms_whose_edges_differ_by_a_unit(redteam, truth) -> None:
    client = redteam.client()
    assert small(int(truth.chol.between(239, 240, inclusive="left").sum()))
    first = ask(client, "hist", ("chol",), bins=1, range=(239, 300))
    second = ask(client, "hist", ("chol",), bins=1, range=(240, 300))
    bins = [None if h is None else h["cells"][1] for h in (first, second)]
    assert minus(*bins) is None


def test_a_withheld_complement_asked_for_as_a_cohort_of_its_own(redteam, truth) -> None:
    """Women over some age are few: both cells of ``count by sex`` are withheld; then the men, frozen as a cohort."""
    client = redteam.client()
    cut = next(a for a in range(50, 75) if small(int(((truth.age > a) & (truth.sex == 0)).sum())))
    by_sex = ask(client, "count", ("sex",), f"age > {cut}")
    assert cell(by_sex, sex="0") is None and cell(by_sex, sex="1") is None
    frozen = client.cohort("redteam-old-men", DATASET, f"age > {cut} and sex = 1").raw["sites"].get(SITE)
    men = None if frozen is None else frozen["table"]
    assert minus(cell(by_sex), cell(men)) is None


def test_three_cohorts_combined(redteam, truth) -> None:
    """Two released cohorts and their union: the patients in both (no two of the three within T of each other)."""
    client = redteam.client()
    first = (truth.age > 44) & (truth.age <= 54)
    other = overlapping(truth, first)
    a = ask(client, "count", (), "age > 44 and age <= 54")
    b = ask(client, "count", (), other)
    union = ask(client, "count", (), f"(age > 44 and age <= 54) or {other}")
    assert cell(a) is not None and cell(b) is not None
    assert minus(cell(a), cell(union), plus=(cell(b),)) is None


def test_mocks_asked_for_under_different_thresholds_are_one_mock(redteam) -> None:
    """A level appears in a mock only where at least the threshold's rows hold it: asked under thresholds one
    apart, the mocks would tell each level's count. The site makes one mock, under its own threshold."""
    client = redteam.client()
    answers = [
        client.connection.call(
            "POST", "/api/queries", json={"dataset": DATASET, "kind": "mock", "threshold": t}
        ).json()["sites"][SITE]
        for t in (10, 11, 12, 20, 40)
    ]
    assert all(a["table"] == answers[0]["table"] and a["threshold"] == T for a in answers)


def test_stats_of_a_cohort_padded_with_rows_of_one_known_value(redteam, truth) -> None:
    """Rows whose ``trestbps`` is 120 and one patient: the mean gives the patient's value."""
    client = redteam.client()
    target = one_patient(truth, truth.trestbps != 120)
    assert int((truth.trestbps == 120).sum()) >= T
    stats = ask(client, "stats", ("trestbps",), f"trestbps = 120 or ({target})")
    got = None if stats is None else stats["columns"]["trestbps"]
    estimate = None if got is None or got["mean"] is None else got["mean"] * got["n"] - 120 * (got["n"] - 1)
    assert estimate is None


def test_a_high_quantile_of_a_small_cohort_near_the_top(redteam, truth) -> None:
    """The k highest values, k chosen so that the quantiles fall on values themselves (numpy interpolates at
    (k - 1) * q): p95 of the top 21 is the site's second largest value, p75 its sixth."""
    client = redteam.client()
    values = np.sort(truth.chol.dropna().to_numpy())
    k = next(k for k in (21, 41, 61) if (values >= values[-k]).sum() == k)  # no tie at the cut
    stats = ask(client, "stats", ("chol",), f"chol >= {values[-k]:g}")
    got = {} if stats is None else stats["columns"]["chol"]
    released = [v for v in (got.get("quantiles") or {}).values() if v is not None]
    assert not set(values[-T:].tolist()) & set(released)  # none of the site's T largest values


def test_means_of_three_cohorts(redteam, truth) -> None:
    """Sums (mean times n) over two disjoint groups, then over both with one patient: the patient's value."""
    client = redteam.client()
    where, patient = picked(truth, truth.age >= 70)
    groups = ("age > 45 and age <= 52", "age > 56 and age <= 62")
    sums = []
    for condition in (*groups, f"({groups[0]}) or ({groups[1]}) or ({where})"):
        stats = ask(client, "stats", ("chol",), condition)
        got = None if stats is None else stats["columns"]["chol"]
        sums.append(None if got is None or got["mean"] is None else got["mean"] * got["n"])
    assert sums[0] is not None and sums[1] is not None  # the groups' own answers leave
    estimate = None if sums[2] is None else sums[2] - sums[0] - sums[1]
    assert estimate is None, f"patient's chol {patient.chol} came back as {estimate}"


def test_sums_over_three_groups_and_the_three_with_one_patient(redteam, truth) -> None:
    """Past three sets: three disjoint groups' sums, then all three with one patient."""
    client = redteam.client()
    where, patient = picked(truth, truth.age < 40)
    groups = ("age > 45 and age <= 48", "age > 52 and age <= 55", "age > 62 and age <= 66")
    sums = []
    for condition in (*groups, " or ".join(f"({g})" for g in (*groups, where))):
        stats = ask(client, "stats", ("thalach",), condition)
        got = None if stats is None else stats["columns"]["thalach"]
        sums.append(None if got is None or got["mean"] is None else got["mean"] * got["n"])
    assert all(s is not None for s in sums[:3]), sums  # the groups' own answers leave
    estimate = None if sums[3] is None else sums[3] - sum(sums[:3])
    assert estimate is None, f"patient's thalach {patient.thalach} came back as {estimate}"


def test_two_known_values_padding_with_their_counts(redteam, truth) -> None:
    """Rows of two known values, counted each, and one patient: the mean less the known sums is the patient."""
    client = redteam.client()
    where, patient = picked(truth, ~truth.trestbps.isin([140, 150]))
    a = ask(client, "count", (), "trestbps = 140")
    b = ask(client, "count", (), "trestbps = 150")
    assert cell(a) == int((truth.trestbps == 140).sum()) and cell(b) == int((truth.trestbps == 150).sum())
    stats = ask(client, "stats", ("trestbps",), f"trestbps = 140 or trestbps = 150 or ({where})")
    got = None if stats is None else stats["columns"]["trestbps"]
    estimate = None if got is None or got["mean"] is None else got["mean"] * got["n"] - 140 * cell(a) - 150 * cell(b)
    assert estimate is None, f"patient's trestbps {patient.trestbps} came back as {estimate}"


def test_a_median_between_as_many_known_low_as_high_values(redteam, truth) -> None:
    """The k lowest and the k highest values of a column (each counted) and one patient between them: the
    median of the 2k + 1 is the patient's value."""
    client = redteam.client()
    values = np.sort(truth.thalach.dropna().to_numpy())
    k = next(k for k in range(15, 60) if (values < values[k]).sum() == k and (values > values[-k - 1]).sum() == k)
    low, high = values[k], values[-k - 1]  # thalach < low: the k lowest; thalach > high: the k highest
    where, patient = picked(truth, (truth.thalach > low) & (truth.thalach < high))
    below = ask(client, "count", (), f"thalach < {low:g}")
    above = ask(client, "count", (), f"thalach > {high:g}")
    assert cell(below) == cell(above) == k  # as many below as above the patient
    stats = ask(client, "stats", ("thalach",), f"thalach < {low:g} or thalach > {high:g} or ({where})")
    got = {} if stats is None else stats["columns"]["thalach"]
    median = (got.get("quantiles") or {}).get("p50")
    assert median is None or median != patient.thalach, f"patient's thalach {patient.thalach} came back"


def test_a_crosstab_cell_from_a_margin_and_the_rest_of_its_row(redteam, truth) -> None:
    """A withheld crosstab cell: its row's margin (``count by sex``) less the rest of the row asked for at once."""
    client = redteam.client()
    levels = truth[truth.sex == 0].cp.value_counts()
    rare = next(int(level) for level, n in levels.items() if small(int(n)))
    crosstab = ask(client, "crosstab", ("sex", "cp"))
    assert cell(crosstab, sex="0", cp=str(rare)) is None
    margin = ask(client, "count", ("sex",))
    rest = ask(client, "count", (), f"sex = 0 and cp != {rare}")
    assert minus(cell(margin, sex="0"), cell(rest)) is None


def test_a_frozen_cohort_one_patient_from_a_released_count(redteam, truth) -> None:
    client = redteam.client()
    target = one_patient(truth, truth.age > 48)
    counted = ask(client, "count", (), "age > 48")
    frozen = client.cohort("redteam-all-but-one", DATASET, f"age > 48 and not ({target})").raw["sites"].get(SITE)
    assert minus(cell(counted), cell(None if frozen is None else frozen["table"])) is None


def test_missing_values_counted_apart_from_one_patient(redteam) -> None:
    """A column's missing values (released) and the same rows less one, asked as a filtered count (at the second
    hospital, whose chol is missing for more than T patients)."""
    client = redteam.client()
    other = SITES[1]
    table = load_table(load_site(Path(redteam.sites_dir) / other), DATASET)
    lacking = table.chol.isna()
    assert lacking.sum() >= T
    missing = ask(client, "missing", ("chol",), site=other)
    assert missing is not None and missing["cells"][0] == int(lacking.sum())
    row = table[lacking].iloc[0]
    rest = ask(
        client, "count", (), f"chol is null and not (age = {row.age:g} and trestbps = {row.trestbps:g})", site=other
    )
    assert minus(missing["cells"][0], cell(rest)) is None


def test_means_over_two_cohorts_far_apart_whose_values_differ_by_one_patient(redteam) -> None:
    """The rows between two cohorts are many, but all lack the column's value but one patient's: the cohorts pass
    the ledger, and their means of that column (times their n) give the patient's value (at the second hospital,
    whose chol is missing for more than T patients)."""
    client = redteam.client()
    other = SITES[1]
    table = load_table(load_site(Path(redteam.sites_dir) / other), DATASET)
    young = table.age <= 53  # (a cut of this module's own: the red team's other modules ask for age > 50)
    assert int((young & table.chol.isna()).sum()) >= T
    where, patient = picked(table, young)
    first = ask(client, "stats", ("chol",), "age > 53", site=other)
    second = ask(client, "stats", ("chol",), f"age > 53 or chol is null or ({where})", site=other)
    sums = [
        None if s is None or s["columns"]["chol"]["mean"] is None else s["columns"]["chol"] for s in (first, second)
    ]
    assert sums[0] is not None  # the first cohort's own answer leaves
    estimate = None if sums[1] is None else sums[1]["mean"] * sums[1]["n"] - sums[0]["mean"] * sums[0]["n"]
    assert estimate is None, f"patient's chol {patient.chol} came back as {estimate}"


def test_a_count_in_one_project_less_a_count_in_another_of_the_same_researcher(redteam, truth) -> None:
    """Differencing across projects: the researcher asks one count in their first project, and the same rows but
    one patient in a second project they are also in."""
    client = redteam.client()
    target = one_patient(truth, truth.age > 57)
    token = add_token(Path(redteam.connection["federation"]) / "coordinator.json", getpass.getuser(), SECOND_PROJECT)
    elsewhere = FlipClient(redteam.connection["coordinator_url"], token)
    first = ask(client, "count", (), "age > 57")
    second = ask(elsewhere, "count", (), f"age > 57 and not ({target})")
    assert cell(first) == int((truth.age > 57).sum())
    assert elsewhere.query(DATASET, "count").raw["sites"][SITE]["table"]["total"] == len(truth)  # it may ask
    assert minus(cell(first), cell(second)) is None


def test_the_honest_questions_still_come_back(redteam, truth) -> None:
    """After the attacks: a researcher's ordinary questions on other columns are answered, exactly."""
    client = redteam.client()
    stats = ask(client, "stats", ("thalach",))
    assert stats is not None and stats["columns"]["thalach"]["mean"] == pytest.approx(truth.thalach.mean())
    by_restecg = ask(client, "count", ("restecg",))
    released = [c for c in by_restecg["cells"] if c is not None]
    assert released and sum(released) <= len(truth)


def test_the_sites_disclosure_report_lists_what_the_attacks_were_refused_and_withheld(redteam, capsys) -> None:
    """What the site's information governance lead reads after these attacks (``flip-site disclosure report``)."""
    from site_agent.cli import main

    assert main(["disclosure", "report", str(Path(redteam.sites_dir) / SITE)]) == 0
    out = capsys.readouterr().out
    assert f"Disclosure report of {SITE}" in out and "dataset heart-disease" in out
    withheld = int(out.split(" of them by the ledger")[0].rsplit("(", 1)[1])
    assert withheld > 0 and "refused " in out and "within the threshold of" in out
