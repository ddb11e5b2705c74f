"""The site's airlock end to end without a federation: requests reach the query service as their bytes, the admin
decides through ``flip-site airlock``, and what a researcher may learn of a request is only their own."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flip_core.airlock import ItemKind, Release, ReleaseAsk, ReleaseInvalid, verify
from flip_core.certs import make_site_keys
from flip_core.query import QueryKind, QueryRequest, decode_reply, encode_query
from flip_core.status import StepStatus
from site_agent.cli import main as flip_site
from site_agent.data.catalog import init_site, write_policy
from site_agent.data.formats import add_dataset
from site_agent.governance.audit import read_records
from site_agent.governance.audit import verify as audit_verify
from site_agent.governance.gate import Governance
from site_agent.queries.cohorts import CohortStore
from site_agent.queries.service import QueryService

PROJECT = "study"
TRACEBACK = """Traceback (most recent call last):
  File "<flip cell>", line 24, in evaluate
RuntimeError: mat1 and mat2 shapes cannot be multiplied (37x3 and 128x10)
"""


def _site(tmp_path: Path, **policy: Any) -> QueryService:
    table = pd.DataFrame(
        {
            "patient": [f"pt{i:04d}x" for i in range(40)],
            "age": [30 + (i % 35) for i in range(40)],
            "sex": ["F"] * 37 + ["M"] * 3,
            "chol": [1.0 + (i % 3) for i in range(39)] + [9000.0],  # one patient dominates the sum
        }
    )
    csv = tmp_path / "cohort.csv"
    table.to_csv(csv, index=False)
    site = add_dataset(init_site(tmp_path / "Site", "Kings"), "heart", csv, "csv")
    project = {"approved": True, "researchers": ["ada"], "datasets": ["*"], "tasks": ["train", "query"]}
    write_policy(site, {"policy": policy, "projects": {PROJECT: project}})
    make_site_keys(site.root / "keys", "Kings")
    governance = Governance(site)
    return QueryService(site, governance, CohortStore(site.root))


def _send(service: QueryService, request: QueryRequest) -> Any:
    return decode_reply(service.answer(encode_query(request)))


def _release_request(item: ItemKind, request_id: str = "rq-0000000001", researcher: str = "ada", **query: Any) -> Any:
    statistic = query.pop("statistic", "")
    ask = ReleaseAsk(
        request_id, item, "to see why my cell failed at Kings", run=query.pop("run", ""), statistic=statistic
    )
    return QueryRequest(
        "q-" + request_id,
        PROJECT,
        researcher,
        query.pop("dataset", ""),
        QueryKind.RELEASE,
        airlock=ask.to_dict(),
        **query,
    )


def _states(request_ids: list[str], researcher: str = "ada", content: bool = False) -> QueryRequest:
    return QueryRequest(
        "s1", PROJECT, researcher, "", QueryKind.RELEASES, airlock={"requests": request_ids, "content": content}
    )


def _fail_a_step(service: QueryService, run: str = "run1", researcher: str = "ada") -> None:
    facts = {"round": 1, "phase": "evaluate", "researcher": researcher, "project": PROJECT, "dataset": "heart"}
    service.governance.airlock.keep(ItemKind.TRACEBACK, run, facts, TRACEBACK)


def test_a_traceback_is_held_until_the_admin_releases_it_then_leaves_signed(tmp_path, capsys) -> None:
    service = _site(tmp_path)
    _fail_a_step(service)
    reply = _send(service, _release_request(ItemKind.TRACEBACK, run="run1"))
    assert (reply.status, reply.table["state"]) == (StepStatus.OK, "pending")
    waiting = _send(service, _states(["rq-0000000001"], content=True)).table["requests"]["rq-0000000001"]
    assert waiting["state"] == "pending" and "content" not in waiting  # nothing of it before a release

    root = str(service.site.root)
    assert flip_site(["airlock", "show", root, "rq-0000000001"]) == 0
    shown = capsys.readouterr().out
    assert "to see why my cell failed at Kings" in shown and "ada" in shown and "automatic checks" in shown
    assert TRACEBACK in shown
    assert flip_site(["airlock", "release", root, "rq-0000000001", "--as", "checker"]) == 0

    told = _send(service, _states(["rq-0000000001"], content=True)).table["requests"]["rq-0000000001"]
    content = base64.b64decode(told["content"])
    assert told["state"] == "released" and content == TRACEBACK.encode()
    release = Release.from_dict(told["release"])
    verify(release, content)  # the site's signature holds
    with pytest.raises(ReleaseInvalid, match="hash differs"):
        verify(release, content + b"x")
    forged = Release.from_dict({**told["release"], "purpose": "something else"})
    with pytest.raises(ReleaseInvalid, match="no valid signature"):
        verify(forged, content)
    with pytest.raises(ReleaseInvalid, match="did not register"):
        verify(release, content, registered="sha256:" + "0" * 64)

    kinds = [r["kind"] for r in read_records(service.site.root)]
    assert {"airlock-request", "airlock-decision", "airlock-delivered"} <= set(kinds)
    assert audit_verify(service.site.root) == []
    capsys.readouterr()
    assert flip_site(["disclosure", "report", root]) == 0  # requests for review are not answers to queries
    assert "has answered no query yet" in capsys.readouterr().out


def test_another_researchers_request_is_unknown_to_you_and_their_run_has_no_traceback_for_you(tmp_path) -> None:
    service = _site(tmp_path)
    _fail_a_step(service)
    refused = _send(service, _release_request(ItemKind.TRACEBACK, run="run1", researcher="eve"))
    assert refused.status == StepStatus.REFUSED  # eve is not in the project at all
    mine = _send(service, _release_request(ItemKind.TRACEBACK, run="run2"))
    assert mine.status == StepStatus.REFUSED and "no step of your run 'run2' failed here" in mine.reason
    assert _send(service, _release_request(ItemKind.TRACEBACK, run="run1")).table["state"] == "pending"
    assert _send(service, _states(["rq-0000000001"], researcher="eve")).table["requests"]["rq-0000000001"] == {
        "state": "unknown"
    }
    twice = _send(service, _release_request(ItemKind.TRACEBACK, run="run1"))
    assert twice.status == StepStatus.REFUSED and "held here already" in twice.reason


def test_a_site_may_refuse_a_kind_outright_and_a_refusal_needs_a_reason(tmp_path, capsys) -> None:
    service = _site(tmp_path, airlock_refuses=["traceback"])
    _fail_a_step(service)
    reply = _send(service, _release_request(ItemKind.TRACEBACK, run="run1"))
    assert reply.table["state"] == "refused" and "refuses every request for a traceback" in reply.table["reason"]
    assert not list((service.site.root / "airlock" / "requests").glob("*.item"))  # nothing held to review

    query = _send(service, _release_request(ItemKind.QUERY, "rq-0000000002", dataset="heart", statistic="count"))
    assert query.table["state"] == "pending"
    root = str(service.site.root)
    with pytest.raises(SystemExit):  # --reason is required
        flip_site(["airlock", "refuse", root, "rq-0000000002"])
    assert flip_site(["airlock", "refuse", root, "rq-0000000002", "--reason", "cells under ten"]) == 0
    assert flip_site(["airlock", "release", root, "rq-0000000002"]) != 0  # decided once
    assert "refused already" in capsys.readouterr().err
    told = _send(service, _states(["rq-0000000002"], content=True)).table["requests"]["rq-0000000002"]
    assert (told["state"], told["reason"]) == ("refused", "cells under ten") and "content" not in told


def test_a_query_result_is_held_exact_with_its_small_cells_and_dominance_flagged(tmp_path, capsys) -> None:
    service = _site(tmp_path)
    counted = _release_request(ItemKind.QUERY, dataset="heart", statistic="count", columns=("sex",), where="age > 0")
    assert _send(service, counted).table["state"] == "pending"
    held = service.governance.airlock.get("rq-0000000001")
    failed = held.failed_checks()
    assert "small cells" in failed  # 3 men
    table = pd.read_csv(service.site.root / "airlock" / "requests" / "rq-0000000001.item")
    assert table.to_dict("list") == {"sex": ["F", "M"], "count": [37, 3]}  # exact: nothing withheld or moved

    stats = _release_request(ItemKind.QUERY, "rq-0000000002", dataset="heart", statistic="stats", columns=("chol",))
    assert _send(service, stats).table["state"] == "pending"
    assert {"dominance (n-k)", "dominance (p-ratio)"} <= set(
        service.governance.airlock.get("rq-0000000002").failed_checks()
    )
    root = str(service.site.root)
    assert flip_site(["airlock", "list", root]) == 0
    listing = capsys.readouterr().out
    assert "rq-0000000001" in listing and "rq-0000000002" in listing and "checks failed: small cells" in listing


def test_a_traceback_naming_a_patient_is_flagged_for_the_admin(tmp_path) -> None:
    service = _site(tmp_path)
    facts = {"round": 1, "phase": "train", "researcher": "ada", "project": PROJECT, "dataset": "heart"}
    service.governance.airlock.keep(ItemKind.TRACEBACK, "run1", facts, "ValueError: bad row pt0007x with chol 157.0\n")
    assert _send(service, _release_request(ItemKind.TRACEBACK, run="run1")).table["state"] == "pending"
    held = service.governance.airlock.get("rq-0000000001")
    assert "identifiers" in held.failed_checks()
    record = next(r for r in read_records(service.site.root) if r["kind"] == "airlock-request")
    assert "identifiers" in record["checks_failed"] and "pt0007x" not in json.dumps(record)  # the log names no value


def _count(where: str) -> QueryRequest:
    return QueryRequest("c-" + where, PROJECT, "ada", "heart", QueryKind.COUNT, where=where, text=f"count {where}")


def test_a_delivered_query_item_joins_the_ledger_and_an_item_near_a_released_answer_is_flagged(tmp_path) -> None:
    service = _site(tmp_path)
    apart = _release_request(ItemKind.QUERY, dataset="heart", statistic="count", where="age < 42", text="under 42")
    assert _send(service, apart).table["state"] == "pending"
    assert {c["name"]: c["passed"] for c in service.governance.airlock.get("rq-0000000001").checks}["differencing"]
    assert flip_site(["airlock", "release", str(service.site.root), "rq-0000000001"]) == 0
    assert _send(service, _states(["rq-0000000001"], content=True)).table["requests"]["rq-0000000001"]["content"]
    # the released exact count of age < 42 is in the ledger now: a cohort one year from it is refused
    refused = _send(service, _count("age < 41"))
    assert refused.status == StepStatus.REFUSED and "airlock rq-0000000001" in refused.reason
    # and an item near it is flagged for the admin (who may still release it: the word is theirs)
    near = _release_request(ItemKind.QUERY, "rq-0000000002", dataset="heart", statistic="count", where="age < 43")
    assert _send(service, near).table["state"] == "pending"
    checks = {c["name"]: c for c in service.governance.airlock.get("rq-0000000002").checks}
    assert not checks["differencing"]["passed"] and "airlock rq-0000000001" in checks["differencing"]["detail"]


def test_a_request_id_that_walks_out_of_the_airlock_is_refused(tmp_path) -> None:
    service = _site(tmp_path)
    _fail_a_step(service)
    for forged in ("../../keys/Kings", "rq-1/../../x", "RQ-UPPER-0001", "rq"):
        reply = _send(service, _release_request(ItemKind.TRACEBACK, forged, run="run1"))
        assert reply.status == StepStatus.REFUSED and "is not a request id" in reply.reason
    assert _send(service, _states(["../../keys/Kings"], content=True)).table["requests"] == {
        "../../keys/Kings": {"state": "unknown"}
    }
    assert not (service.site.root / "keys" / "Kings.json").exists()
