"""Federated queries through the real federation: the notebook's client, the coordinator, the query line
(a Flower run), four hospital site agents. The ground truth is pandas over the four shared files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import requests
import statsmodels.api as sm
import statsmodels.formula.api as smf

from flip_core.errors import Rejected
from flip_core.util import wait_until
from flip_local.federation import restart
from flip_local.sites import HEART_SITES, HEART_SPLIT
from site_agent.data.catalog import load_site
from site_agent.data.formats import add_dataset, read_table

from helpers import TINY_CELL, flip, flip_run, shared_data, static_figures

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
DATASET = "heart-disease"
THRESHOLD = 10
NOISE = 2  # the local federation's sites move each released count by at most this (the default)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {site: read_table(shared_data() / DATASET / f, "uci-heart") for site, f in HEART_SITES.items()}


@pytest.fixture(scope="module")
def pooled_truth(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pd.concat(tables.values(), ignore_index=True)


def _cells(frame: pd.DataFrame, by: list[str]) -> dict[tuple[str, ...], object]:
    return {tuple(str(row[c]) for c in by): row["count"] for _, row in frame.iterrows()}


def _label(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else format(value, "g")


def test_count_by_sex_is_pooled_within_its_noise_and_withholds_small_cells(federation, tables, pooled_truth) -> None:
    result = federation.client().query(DATASET, "count", ["sex"])
    assert result.refused == {}
    pooled = _cells(result.pooled, ["sex"])
    noise = _cells(result.pooled.drop(columns="count").rename(columns={"noise": "count"}), ["sex"])
    for sex, count in pooled_truth.groupby("sex").size().items():
        at_sites = result.sites[result.sites.sex == _label(sex)]["count"]
        others = set(result.sites[result.sites.sex == "(other)"].site)  # sites whose other may hold this sex
        unnamed = others - set(result.sites[result.sites.sex == _label(sex)].site)
        if at_sites.isna().any() or unnamed:
            assert pd.isna(pooled[(_label(sex),)])
        else:  # off by at most the noise of the sites in it, and says so
            assert noise[(_label(sex),)] == NOISE * len(at_sites)
            assert abs(pooled[(_label(sex),)] - count) <= noise[(_label(sex),)]
    for site, table in tables.items():
        mine = result.sites[result.sites.site == site]
        for sex, count in table.groupby("sex").size().items():
            got = mine[mine.sex == _label(sex)]
            if got.empty:  # too few in the whole table to name: counted as other
                assert count < THRESHOLD and pd.isna(mine[mine.sex == "(other)"]["count"].iloc[0])
            elif count < THRESHOLD or site == "VA":
                assert pd.isna(got["count"].iloc[0])
            else:
                assert abs(got["count"].iloc[0] - count) <= NOISE and got["noise"].iloc[0] == NOISE
        assert abs(result.totals[site] - len(table)) <= NOISE
    # VA has 6 women: too few to name, withheld as its other, and so its 194 men (its total less them gives the 6)
    assert result.sites[result.sites.site == "VA"]["count"].isna().all()
    assert abs(result.totals["pooled"] - len(pooled_truth)) <= 4 * NOISE
    assert any("perturbed by at most" in note for note in result.notes)


def test_stats_pooled_mean_and_std_are_within_one_percent(federation, pooled_truth) -> None:
    where = "age > 50"
    result = federation.client().query(DATASET, "stats", ["age", "trestbps", "thalach"], where)
    cohort = pooled_truth[pooled_truth.age > 50]
    for column in ("age", "trestbps", "thalach"):
        row = result.pooled.set_index("column").loc[column]
        values = cohort[column].dropna()
        assert abs(int(row["n"]) - len(values)) <= row["noise"] == 4 * NOISE
        assert row["mean"] == pytest.approx(values.mean(), rel=0.01)  # each site's moved by at most std/n, and
        assert row["std"] == pytest.approx(values.std(ddof=1), rel=0.01)  # pooled with its moved n
        assert row["p50"] == pytest.approx(values.median(), rel=0.05)  # merged sketches: approximate, and said so
    assert any("pooled n, mean and std are approximate" in note for note in result.notes)


def test_crosstab_withholds_small_cells_and_their_complements(federation, tables) -> None:
    result = federation.client().query(DATASET, "crosstab", ["sex", "cp"])
    swiss = result.sites[result.sites.site == "Switzerland"]
    truth = tables["Switzerland"].groupby(["sex", "cp"]).size()
    small = [k for k, v in truth.items() if v < THRESHOLD]
    assert small, "the Switzerland table has small sex x cp cells"
    for sex, cp in small:  # withheld, or not named at all (cp 1 and 2: under the threshold in its whole table)
        named = swiss[(swiss.sex == _label(sex)) & (swiss.cp == _label(cp))]["count"]
        assert named.empty or pd.isna(named.iloc[0])
    assert set(swiss.cp) == {"3", "4", "(other)"} and swiss[swiss.cp == "(other)"]["count"].isna().all()
    grid = result.wide()
    assert grid.shape == tuple(len(levels) for levels in result.raw["pooled"]["levels"])
    # a pooled cell where any site withheld its own is withheld too (pooled minus the others would reveal it)
    for (sex, cp), cell in _cells(result.pooled, ["sex", "cp"]).items():
        site_cells = result.sites[(result.sites.sex == sex) & (result.sites.cp == cp)]["count"]
        if site_cells.isna().any():
            assert pd.isna(cell)


def test_a_withheld_crosstab_leaves_exact_through_the_airlock_once_the_site_releases_it(federation, tables) -> None:
    client = federation.client()
    query = {"dataset": DATASET, "kind": "crosstab", "columns": ["sex", "cp"]}
    purpose = "table 1 of our paper: chest pain type by sex at each hospital, small cells included"
    asked = client.request_release("query", "Switzerland", purpose, query=query)
    assert asked.state == "pending" and asked.site == "Switzerland"
    site_dir = federation.home / "federation" / "sites" / "Switzerland"
    review = subprocess.run(
        [BIN / "flip-site", "airlock", "show", site_dir, asked.request_id], capture_output=True, text=True, check=True
    ).stdout
    truth = tables["Switzerland"].groupby(["sex", "cp"]).size()
    small = {(int(sex), int(cp)): n for (sex, cp), n in truth.items() if n < THRESHOLD}
    # the admin sees who asked and why, the checks (the small cells named), and the exact table
    assert purpose in review and "FAIL  small cells" in review and "automatic checks" in review
    assert "sex,cp,count" in review
    subprocess.run([BIN / "flip-site", "airlock", "release", site_dir, asked.request_id], check=True, timeout=60)

    item = client.released(asked.request_id)
    frame = item.value
    got = {(int(r.sex), int(r.cp)): int(r["count"]) for _, r in frame.iterrows()}
    exact = {(int(sex), int(cp)): int(n) for (sex, cp), n in truth.items()}
    assert {k: n for k, n in got.items() if n} == exact  # exact, small cells and all (and its zeros as cells)
    assert small and all(got[k] == n for k, n in small.items())
    assert item.release.site == "Switzerland" and item.release.purpose == purpose
    fetched = flip("airlock", "get", asked.request_id)  # the same item, headless, from the site again
    assert fetched.returncode == 0 and fetched.stdout.encode() == item.content, fetched.stderr


def test_a_cohort_one_patient_from_an_answered_one_is_refused(federation, tables) -> None:
    client = federation.client()
    first = client.query(DATASET, "count", where="age > 45")
    assert first.refused == {}
    patient = tables["Cleveland"].query("age > 45").iloc[0]
    one_out = (
        f"age > 45 and not (age = {patient.age:g} and trestbps = {patient.trestbps:g} and chol = {patient.chol:g})"
    )
    second = client.query(DATASET, "count", where=one_out)
    assert "Cleveland" in second.refused
    assert "differs by fewer than 10 rows" in second.refused["Cleveland"]
    assert set(second.sites.site) == {"Hungary", "Switzerland", "VA"}  # the same cohort there as before: answered


def test_a_filter_that_isolates_one_patient_releases_nothing(federation, tables) -> None:
    patient = tables["VA"].iloc[3]
    where = f"age = {patient.age:g} and trestbps = {patient.trestbps:g} and thalach = {patient.thalach:g}"
    result = federation.client().query(DATASET, "stats", ["age"], where, sites=["VA"])
    row = result.sites.iloc[0]
    assert pd.isna(row["n"]) and np.isnan(row["mean"]) and np.isnan(row["p50"])
    assert pd.isna(result.pooled.iloc[0]["n"])


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("agee > 50", "unknown column 'agee'"),
        ("t.age > 50", "table"),
        ("lower(age) > 1", "function"),
        ("__class__ > 1", "__class__"),
        ("age > (select 1)", "subquer"),
        ("age + 1 > 2", "not allowed"),
        ("age > 50; drop table x", "not valid"),
    ],
)
def test_hostile_filters_are_refused_in_a_sentence(federation, where, says) -> None:
    with pytest.raises(Rejected) as refused:  # in the kernel (RequestInvalid) or by the coordinator, with its status
        federation.client().query(DATASET, "count", where=where)
    assert says in str(refused.value)


def test_the_coordinator_refuses_what_the_client_would_have(federation) -> None:
    """Sent past the client: a 1 MB filter, an unknown column, a function call; each a 4xx sentence."""
    conn = federation.connection
    post = lambda body: requests.post(  # noqa: E731
        conn["coordinator_url"] + "/api/queries",
        json=body,
        headers={"Authorization": f"Bearer {conn['token']}"},
        timeout=30,
    )
    huge = post({"dataset": DATASET, "kind": "count", "where": "age > 1 or " * 100_000})
    assert huge.status_code in (400, 413) and "too long" in huge.json()["error"]
    unknown = post({"dataset": DATASET, "kind": "stats", "columns": ["weight"]})
    assert unknown.status_code == 404 and "age, sex" in unknown.json()["error"]
    call = post({"dataset": DATASET, "kind": "count", "where": "exec('import os') = 1"})
    assert call.status_code == 400 and "function" in call.json()["error"]
    with pytest.raises(Rejected, match="unknown dataset"):
        federation.client().query("heart", "count")


def test_hist_and_missing_and_the_audit_record(federation, pooled_truth) -> None:
    client = federation.client()
    hist = client.query(DATASET, "hist", ["thalach"], bins=5, range=(60, 210))
    counts = dict(zip(hist.pooled["thalach"], hist.pooled["count"], strict=True))
    inside = pooled_truth.thalach[(pooled_truth.thalach >= 120) & (pooled_truth.thalach < 150)]
    assert abs(counts["[120, 150)"] - len(inside)) <= 4 * NOISE or pd.isna(counts["[120, 150)"])
    missing = client.query(DATASET, "missing", ["chol", "ca"])
    swiss = missing.sites[(missing.sites.site == "Switzerland") & (missing.sites.column == "ca")]
    assert set(swiss.state) == {"missing", "present"}
    records = [json.loads(line) for line in _audit(federation.home, "Hungary").read_text().splitlines()]
    queries = [r for r in records if r["kind"] == "query"]
    assert queries and queries[-1]["text"].startswith(DATASET) and queries[-1]["verdict"] == "ok"
    assert queries[-1]["released"]["dims"] == ["column", "state"]


def _audit(home: Path, site: str) -> Path:
    return home / "federation" / "sites" / site / "audit" / "audit.jsonl"


def test_mocks_hold_no_real_row_and_a_mock_run_says_mock_and_sends_nothing(federation, tables) -> None:
    client = federation.client()
    mocks = client.mock(DATASET)
    assert sorted(mocks) == sorted(HEART_SITES)
    for site, mock in mocks.items():
        real = tables[site]
        assert list(mock.columns) == list(real.columns) and len(mock) % 10 == 0
        assert mock.merge(real.drop_duplicates(), how="inner").empty  # no row of the mock is a real row
    assert set(mocks["VA"].sex.dropna()) == {1}  # VA's 6 women are under the threshold: no woman in its mock
    runs_before = len(client.runs())
    run = client.train(TINY_CELL, dataset=DATASET, rounds=2, seed=3, mock=True, name="dry")
    run.wait(timeout=120)
    assert run.name == "MOCK dry" and run.record["mock"] is True and "MOCK" in repr(run)
    assert set(run.history.site) == {*HEART_SITES, "global"} and set(run.history["round"]) == {0, 1, 2}
    assert run.model is not None and len(client.runs()) == runs_before  # nothing was submitted
    failing = client.train(
        TINY_CELL.replace("X, y = _xy(data.train)", "X, y = _xy(data.train.drop(columns='age'))"),
        dataset=DATASET,
        mock=True,
    )
    with pytest.raises(Exception, match="MOCK run failed: KeyError at cell line"):
        failing.wait(timeout=120)


def test_the_catalog_lists_each_sites_columns_and_withholds_small_missing_counts(federation, tables) -> None:
    frame = federation.client().datasets().set_index(["site", "column"])
    assert len(frame) == 4 * 14
    assert abs(frame.loc[("Hungary", "chol"), "missing"] - int(tables["Hungary"].chol.isna().sum())) <= NOISE  # 23
    assert pd.isna(frame.loc[("Cleveland", "ca"), "missing"])  # 4 missing: under the threshold, withheld
    assert frame.loc[("VA", "age"), "rows"] == 200


def test_a_site_that_dies_is_named_within_seconds_and_the_others_answer(federation) -> None:
    client = federation.client()
    os.killpg(federation.pid("site-VA"), signal.SIGKILL)
    started = time.monotonic()
    result = client.query(DATASET, "count", ["sex"])
    print(f"answered {time.monotonic() - started:.1f} s after VA was killed: {result.refused}")
    assert "offline" in result.refused["VA"]
    assert set(result.sites.site) == {"Cleveland", "Hungary", "Switzerland"}
    restart("site-VA", federation.home)
    assert wait_until(lambda: {s["site"]: s["status"] for s in client.sites()}["VA"] == "online", 120, 0.2)


def test_a_cohort_trains_exactly_as_a_prefiltered_copy_of_each_table(federation, tables) -> None:
    """Freeze age > 50 at each site; train on it; then register each site's table filtered by hand as a
    dataset of its own (same split settings), restart the agents, train on that: the same model."""
    client = federation.client()
    made = client.cohort("over50", DATASET, "age > 50")
    assert made.refused == {} and sorted(made.cohort["sites"]) == sorted(HEART_SITES)
    for site, table in tables.items():
        assert abs(made.totals[site] - int((table.age > 50).sum())) <= NOISE
        assert made.cohort["sites"][site]["hash"].startswith("hmac-sha256:")
    assert client.cohort("over50", DATASET, "age > 50").cohort["sites"] == made.cohort["sites"]  # made again: the same
    redefined = client.cohort("over50", DATASET, "age > 60")
    assert redefined.sites.empty and "already exists with another definition" in redefined.refused["Cleveland"]
    with pytest.raises(Rejected, match="no cohort 'over40'"):
        client.train(TINY_CELL, dataset=DATASET, cohort="over40")

    on_cohort = client.train(TINY_CELL, dataset=DATASET, cohort="over50", rounds=2, seed=7, name="cohort")
    on_cohort.wait(timeout=300)
    assert on_cohort.record["cohort"]["name"] == "over50" and on_cohort.record["cohort"]["where"] == "age > 50"
    assert on_cohort.record["cohort"]["sites"] == made.cohort["sites"]

    for site, table in tables.items():
        site_dir = federation.home / "federation" / "sites" / site
        copy = site_dir / "over50.data"
        table[table.age > 50].to_csv(copy, header=False, index=False, na_rep="?")
        add_dataset(load_site(site_dir), "heart-over50", copy, "uci-heart", **HEART_SPLIT)
        restart(f"site-{site}", federation.home)

    def copies_online() -> bool:
        sites = client.sites()
        return all(s["status"] == "online" and "heart-over50" in {d["name"] for d in s["datasets"]} for s in sites)

    assert wait_until(copies_online, 120, 0.2)
    on_copy = client.train(TINY_CELL, dataset="heart-over50", rounds=2, seed=7, name="copy")
    on_copy.wait(timeout=300)
    cohort_model, copy_model = client.model_params(on_cohort.run_id), client.model_params(on_copy.run_id)
    assert cohort_model.keys() == copy_model.keys()
    for name in cohort_model:
        np.testing.assert_array_equal(cohort_model[name], copy_model[name])
    trained = on_cohort.history.query("phase == 'train' and metric == 'loss'")
    assert len(trained) >= 8  # four sites, two rounds: the comparison is of a real run


def test_the_cohort_notebook_runs_headless_under_flip_run(federation, tables, pooled_truth, tmp_path) -> None:
    waiting = federation.client().request_release(  # left pending: flip run lists it at its end
        "query",
        "VA",
        "the counts by sex at VA for our table 1",
        query={"dataset": DATASET, "kind": "count", "columns": ["sex"]},
    )
    execution = flip_run("00_cohort_heart.ipynb", tmp_path, rounds=2)
    assert f"airlock: request {waiting.request_id} to VA for a query is pending" in execution["stdout"]
    out = tmp_path / "00_cohort_heart.ipynb"
    assert len(execution["runs"]) == 1 and static_figures(out), "the executed notebook shows its run"
    summary = json.loads((tmp_path / "cohort_summary.json").read_text())
    assert abs(summary["sites_by_sex"]["Cleveland/0"] - 97) <= NOISE and summary["sites_by_sex"]["VA/1"] is None
    assert "VA/0" not in summary["sites_by_sex"]  # VA's 6 women are too few to name: its other, withheld
    assert set(summary["pooled_by_sex"].values()) == {None}  # VA withheld its men and its other: so is the pool
    assert summary["age_pooled"]["mean"] == pytest.approx(pooled_truth.age.mean(), rel=0.01)
    for site, t in tables.items():
        assert abs(summary["cohort_rows"][site] - int((t.age > 50).sum())) <= NOISE
    cohort = pooled_truth[pooled_truth.age > 50]
    for column, (mean, std) in summary["standardisation"].items():  # the sites' moved n, mean and std, pooled
        assert mean == pytest.approx(cohort[column].mean(), rel=0.01)
        assert std == pytest.approx(cohort[column].std(ddof=1), rel=0.01)
    assert summary["dry_run"] == {"status": "completed", "name": "MOCK cohort-heart", "mock": True}
    assert summary["run_cohort"] == "over50" and set(summary["site_accuracy"]) == set(HEART_SITES)
    glm = summary["glm"]  # the regression on the cohort: statsmodels' fit of the answering sites' cohort rows
    assert list(glm["refused"]) == ["Switzerland"] and list(glm["sites"]) == ["Cleveland", "Hungary", "VA"]
    rows = pd.concat([tables[s][tables[s].age > 50] for s in glm["sites"]], ignore_index=True)
    reference = smf.glm("disease ~ age + exang + oldpeak", rows.assign(disease=(rows.num > 0).astype(int)),
                        family=sm.families.Binomial()).fit()  # fmt: skip
    for name, fitted in glm["coefficients"].items():
        assert fitted["estimate"] == pytest.approx(reference.params[name], rel=1e-6)
        assert fitted["se"] == pytest.approx(reference.bse[name], rel=1e-6)
    assert sum(glm["sites"].values()) == reference.nobs
    executed = nbformat.read(out, as_version=4)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the figures (and the forest plot) stay
    assert any("MOCK" in str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", "")) for o in outputs)
