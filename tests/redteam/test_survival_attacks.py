"""Attacks on survival across sites (issue 29) at one site's query service, as a hostile researcher (or a hub that
passes on what they ask) would make them: the time a single patient had the event, a curve of a site alone, two
curves whose rows differ by one patient. Real data: a quarter of ACTG 175 (Hammer et al. 1996; 535 patients, 120
events) registered at a site; each reply is what would cross the wire."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flip_core.certs import make_site_keys
from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortStore
from site_agent.queries.service import QueryService

THRESHOLD = 10


@pytest.fixture
def part(tmp_path: Path) -> pd.DataFrame:
    table = pd.read_csv(resources.files("lifelines") / "datasets" / "ACTG175.csv")
    return table.iloc[0::4][["days", "cens", "treat", "age", "arms"]].reset_index(drop=True)


def _site(tmp_path: Path, part: pd.DataFrame, alone: bool = True) -> QueryService:
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = tmp_path / "actg.csv"
    part.to_csv(csv, index=False)
    site = add_dataset(init_site(tmp_path / "Site", "Kings"), "actg", csv, "csv")
    project = {"approved": True, "researchers": ["mallory"], "datasets": ["*"], "tasks": ["query"],
               "model_alone": alone}  # fmt: skip
    write_policy(site, {"policy": {}, "projects": {"study": project}})
    make_site_keys(site.root / "keys", "Kings")
    return QueryService(site, Governance(site), CohortStore(site.root))


def ask(service: QueryService, where: str = "", **model: Any) -> Any:
    body = {"kind": "km", "time": "days", "event": "cens", "stage": "counts", "sites": 2, **model}
    request = QueryRequest(f"q{len(str(body))}{where}", "study", "mallory", "actg", QueryKind.SURVIVAL, where=where,
                           text="an attack", model=body)  # fmt: skip
    return decode_reply(service.answer(encode_query(request)))


def reply_events(reply: Any) -> list[int]:
    """The events of the first kept bin of the one curve."""
    return [reply.table["groups"]["all"]["events"][0]]


def _counts(reply: Any) -> list[int]:
    groups = reply.table["groups"].values()
    return [n for g in groups for n in (g["n"], *g["events"], *g["censored"])]


def test_a_bin_that_holds_one_patients_event_is_merged_and_no_small_count_leaves(tmp_path, part) -> None:
    """One patient had the event by day 14 and one more by day 55: edges at 14 and 55 would tell both days."""
    service = _site(tmp_path, part)
    reply = ask(service, edges=[14, 55, 100, 365, 730, 1260])
    assert reply.status == StepStatus.OK, reply.reason
    assert 14.0 not in reply.table["edges"] and 55.0 not in reply.table["edges"]
    assert not [n for n in _counts(reply) if 0 < n < THRESHOLD]
    assert reply.table["notes"] == ["merged [0, 100] into (100, 365]: fewer than 10 events or censorings there"]


def test_edges_a_day_apart_would_difference_one_patient_out_and_the_ledger_refuses(tmp_path, part) -> None:
    """A curve with an edge at day 391 and another at day 392 (two events on day 392): each bin is safe on its own,
    but their first bins' events differ by the events of one day. The second curve is refused."""
    service = _site(tmp_path, part)
    first = ask(service, edges=[391, 730, 1260])
    assert first.status == StepStatus.OK, first.reason
    sizes = {e.text.split(": ", 1)[1]: e.size for _, _, e in service.ledger._entries["actg"]}
    (events,) = [n for n in reply_events(first)]
    assert sizes["all: events in kept bin 0"] == events and sizes["all: its rows"] == len(part)
    second = ask(service, edges=[392, 730, 1260])
    assert second.status == StepStatus.REFUSED and second.table == {}
    assert "differ by fewer than the threshold from rows this site already released" in second.reason


def test_two_curves_whose_rows_differ_by_one_patient_are_refused(tmp_path, part) -> None:
    service = _site(tmp_path, part)
    assert ask(service, where="age > 30", edges=[365, 730, 1260]).status == StepStatus.OK
    one = part[part["age"] > 30].iloc[0]
    again = ask(service, where=f"age > 30 and not (age = {one.age} and days = {one.days})", edges=[365, 730, 1260])
    assert again.status == StepStatus.REFUSED and again.table == {}


def test_a_curve_or_model_of_a_site_alone_and_malformed_steps_are_refused(tmp_path, part) -> None:
    service = _site(tmp_path, part, alone=False)
    alone = ask(service, sites=1, edges=[365, 730, 1260])
    assert alone.status == StepStatus.REFUSED and "model_alone = false" in alone.reason
    for model, says in [
        ({"edges": [730, 365]}, "bin edges increase"),
        ({"kind": "cox", "terms": "age", "stage": "step", "beta": "x"}, "one finite number per parameter"),
        ({"kind": "cox", "terms": "age + __import__('os')", "stage": "step"}, "is not a column, C(column), 1 or 0"),
        ({"kind": "cox", "terms": "age", "stage": "step", "beta": [0.0], "time": "nope"}, "no column 'nope'"),
        ({"group": "arms", "levels": ["0", "1"], "edges": [365, 730, 1260]}, "a level the request does not name"),
    ]:
        reply = ask(service, **model)
        assert reply.status == StepStatus.REFUSED and reply.table == {}
        assert says in reply.reason, reply.reason


def test_a_cox_step_releases_sums_only_and_refuses_a_small_side(tmp_path, part) -> None:
    service = _site(tmp_path, part)
    step = ask(service, kind="cox", terms="age + treat", stage="step", beta=[0.0, 0.0])
    assert step.status == StepStatus.OK, step.reason
    assert set(step.table) == {"rows", "statistics"} and step.table["rows"] == len(part)
    assert np.asarray(step.table["statistics"]["information"]).shape == (2, 2)
    few = part.assign(rare=(np.arange(len(part)) < 4).astype(int))  # four patients marked: too few on one side
    rare = ask(_site(tmp_path / "rare", few), kind="cox", terms="age + rare", stage="step", beta=[0.0, 0.0])
    assert rare.status == StepStatus.REFUSED and "rare is 0 or 1" in rare.reason


def test_a_column_of_many_levels_as_a_model_term_or_a_curves_group_is_refused_before_it_costs_the_site(
    tmp_path,
) -> None:
    """A column with 55 levels (each held by about 39 rows: every one above the threshold) as a categorical term
    would make a design of 55 columns and over a thousand crosses to check and enter; as a group, 55 curves' bins."""
    table = pd.read_csv(resources.files("lifelines") / "datasets" / "ACTG175.csv")[["days", "cens", "age"]]
    service = _site(tmp_path, table.assign(ward=np.arange(len(table)) % 55))
    for kind, model, says in [
        (
            QueryKind.GLM,
            {"formula": "cens ~ age + C(ward)", "family": "binomial", "stage": "levels"},
            "'ward' has more than 50 levels here: a model has at most 50 parameters",
        ),
        (
            QueryKind.SURVIVAL,
            {
                "kind": "km",
                "time": "days",
                "event": "cens",
                "group": "ward",
                "stage": "levels",
                "edges": [365, 730, 1260],
            },
            "'ward' has more than 20 levels here: at most 20 curves are drawn",
        ),  # fmt: skip
    ]:
        request = QueryRequest(f"q-{kind}", "study", "mallory", "actg", kind, model={**model, "sites": 2})
        reply = decode_reply(service.answer(encode_query(request)))
        assert reply.status == StepStatus.REFUSED and reply.table == {} and says in reply.reason, reply.reason
