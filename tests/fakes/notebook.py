"""Fakes of the notebook's side: FlipClient as the magics and the ``flip`` commands call it, and an HTML widget."""

from __future__ import annotations

import copy
from typing import Any

# A fake hub's answers to POST /api/survival (numbers made up, no patient behind them): Kaplan-Meier curves of two
# arms at the edges 0, 60, 90 (VA merged (0, 30] and (30, 60]; Zurich refused), and a binned Cox model of two terms.
FAKE_KM_ANSWER: dict[str, Any] = {
    "kind": "km", "dataset": "fake-trial", "time": "days", "event": "died", "group": "arm", "where": "",
    "cohort": None, "text": "Kaplan-Meier by arm: days until died over fake-trial",
    "edges": [0.0, 30.0, 60.0, 90.0], "kept_edges": [0.0, 60.0, 90.0],
    "curves": {
        "A": {"time": [0.0, 60.0, 90.0], "at_risk": [40, 40, 28], "events": [0, 12, 10], "censored": [0, 0, 18],
              "survival": [1.0, 0.7, 0.45], "ci_low": [1.0, 0.5326, 0.2934], "ci_high": [1.0, 0.8171, 0.5946]},
        "B": {"time": [0.0, 60.0, 90.0], "at_risk": [30, 30, 24], "events": [0, 6, 4], "censored": [0, 0, 20],
              "survival": [1.0, 0.8, 0.6667], "ci_low": [1.0, 0.608, 0.4692], "ci_high": [1.0, 0.9048, 0.8047]},
    },
    "logrank": {"statistic": 2.948, "df": 1, "p": 0.08597, "observed": {"A": 22, "B": 10},
                "expected": {"A": 17.82, "B": 14.18}},
    "sites": {"Hungary": {"rows": 38, "notes": []},
              "VA": {"rows": 32, "notes": ["merged (0, 30] into (30, 60]: fewer than 10 events or censorings there"]}},
    "refused": {"Zurich": "Zurich: the dataset fake-trial has no column 'days'"},
    "rows": 70,
}  # fmt: skip
FAKE_COX_ANSWER: dict[str, Any] = {
    "kind": "cox", "family": "cox", "binned": True, "dataset": "fake-trial", "formula": "age + C(arm)",
    "time": "days", "event": "died", "where": "", "cohort": None, "text": "Cox age + C(arm)",
    "coefficients": [
        {"name": "age", "estimate": 0.03, "se": 0.01, "z": 3.0, "p": 0.0027, "ci_low": 0.0104, "ci_high": 0.0496},
        {"name": "C(arm)[T.B]", "estimate": -0.5, "se": 0.25, "z": -2.0, "p": 0.0455, "ci_low": -0.99,
         "ci_high": -0.01},
    ],
    "rows": 70, "events": 32, "iterations": 5, "log_likelihood": -120.5, "deviance": 241.0,
    "levels": {"arm": ["A", "B"]}, "sites": {"Hungary": {"rows": 38}, "VA": {"rows": 32}}, "refused": {},
    "hazards_test": {"names": ["age", "C(arm)[T.B]"], "statistics": [0.8, 4.1], "pvalues": [0.371, 0.0429],
                     "global_statistic": 4.6, "global_df": 2, "global_pvalue": 0.1003},
    "kept_edges": [0.0, 60.0, 90.0],
}  # fmt: skip


def fake_km_answer(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`FAKE_KM_ANSWER` with ``changes``."""
    return {**copy.deepcopy(FAKE_KM_ANSWER), **changes}


def fake_cox_answer(**changes: Any) -> dict[str, Any]:
    """A deep copy of :data:`FAKE_COX_ANSWER` with ``changes``."""
    return {**copy.deepcopy(FAKE_COX_ANSWER), **changes}


class FakeTrainClient:
    """Stands in for FlipClient's training side: records train()'s arguments instead of submitting."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def train(self, source: str, **options: Any) -> str:
        self.calls.append({"source": source, **options})
        return "handle"

    def explain_failure(self, handle: Any) -> None:
        return None


class FakeQueryClient:
    """Stands in for FlipClient's query side: records query() and cohort() instead of asking any site."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def query(self, *args: Any, **options: Any) -> str:
        self.calls.append(("query", args, options))
        return "result"

    def cohort(self, *args: Any, **options: Any) -> str:
        self.calls.append(("cohort", args, options))
        return "cohort"

    def glm(self, *args: Any, **options: Any) -> Any:
        """A fitted model as the hub would answer one of two coefficients (numbers made up: a fake)."""
        from flip_magics.models import model_from

        self.calls.append(("glm", args, options))
        row = {"estimate": 0.5, "se": 0.1, "z": 5.0, "p": 1e-6, "ci_low": 0.3, "ci_high": 0.7}
        return model_from({"family": args[2], "formula": args[0], "dataset": args[1], "rows": 40, "iterations": 4,
                           "deviance": 1.0, "scale": 1.0, "sites": {"A": {"rows": 20}, "B": {"rows": 20}},
                           "coefficients": [{"name": "Intercept", **row}, {"name": "age", **row}]})  # fmt: skip

    def km(self, *args: Any, **options: Any) -> Any:
        """The fake hub's Kaplan-Meier curves (:data:`FAKE_KM_ANSWER`), named as asked."""
        from flip_magics.survival import survival_from

        self.calls.append(("km", args, options))
        answer = fake_km_answer(dataset=args[0], time=args[1], event=args[2], edges=list(args[3]))
        return survival_from(answer | {"group": options.get("group")})

    def cox(self, *args: Any, **options: Any) -> Any:
        """The fake hub's Cox model (:data:`FAKE_COX_ANSWER`), named as asked."""
        from flip_magics.models import model_from

        self.calls.append(("cox", args, options))
        answer = fake_cox_answer(formula=args[0], dataset=args[1], time=args[2], event=args[3])
        return model_from(answer | {"binned": options.get("binned", False)})


class FakeAirlockClient:
    """Stands in for FlipClient's airlock side: records request_release() and answers requests() and released()
    from what it was given, asking no site."""

    def __init__(self, item: Any = None) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.item = item

    def request_release(self, *args: Any, **options: Any) -> Any:
        from flip_magics.airlock import AirlockRequest

        self.calls.append((args, options))
        return AirlockRequest("rq-0000000001", args[1], args[0], args[2], "pending")

    def requests(self) -> list[Any]:
        from flip_magics.airlock import AirlockRequest

        return [AirlockRequest("rq-0000000001", "Hungary", "traceback", "why it fails", "refused", "too much")]

    def released(self, request_id: str) -> Any:
        return self.item


class FakeRecordClient:
    """Stands in for FlipClient.run: one stored run record (no coordinator)."""

    def __init__(self, record: dict[str, object]) -> None:
        self.record = record

    def run(self, run_id: str) -> dict[str, object]:
        return {"record": self.record}


class FakeHTMLWidget:
    """Stands in for an ipywidgets.HTML: counts ``.value`` assignments."""

    def __init__(self) -> None:
        self.assignments: list[str] = []

    @property
    def value(self) -> str:
        return self.assignments[-1] if self.assignments else ""

    @value.setter
    def value(self, v: str) -> None:
        self.assignments.append(v)


class FakeFailedRun:
    """Stands in for a RunHandle whose run failed at a site: its events, its cell and the task this kernel prepared
    (None: attached); it tells its end to each callback twice, as the follower thread and the waiting thread do."""

    def __init__(self, events: list[dict[str, Any]], source: str, task: Any = None, run_id: str = "r-failed") -> None:
        self.run_id, self.name, self.rounds, self.round = run_id, "failing", 1, 0
        self.status, self.reason, self.connection_note = "failed", "Run stopped in round 0", ""
        self.events, self.source, self.task = events, source, task

    def chart_points(self) -> list[Any]:
        return []

    def site_rows(self) -> list[dict[str, Any]]:
        return []

    def subscribe(self, callback: Any) -> None:
        callback(self)

    def when_ended(self, callback: Any) -> None:
        callback(self)
        callback(self)


class FakeResponse:
    """Stands in for a requests.Response: its JSON body."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def json(self) -> Any:
        return self.body


class FakeRunConnection:
    """Stands in for flip_magics.connection.Connection: one stored run's view, and each site's mock as the query desk
    answers a mock query (refused where ``mocks`` has none); records the queries asked."""

    def __init__(self, view: dict[str, Any], mocks: dict[str, dict[str, Any]]) -> None:
        self.view, self.mocks = view, mocks
        self.asked: list[dict[str, Any]] = []

    def run(self, run_id: str) -> dict[str, Any]:
        return self.view

    def call(self, method: str, path: str, json: Any = None, **options: Any) -> FakeResponse:
        assert (method, path) == ("POST", "/api/queries"), path
        self.asked.append(json)
        sites = json.get("sites") or sorted(self.mocks)
        answered = {s: {"threshold": 10, "table": self.mocks[s]} for s in sites if s in self.mocks}
        refused = {s: f"{s}: the site makes no mock of it" for s in sites if s not in self.mocks}
        return FakeResponse({"sites": answered, "refused": refused})


class FakeSurvivalConnection:
    """Stands in for flip_magics.connection.Connection at ``POST /api/survival``: records each body sent and answers
    with the fake hub's answer for its kind."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, Any, dict[str, Any]]] = []

    def call(self, method: str, path: str, json: Any = None, **options: Any) -> FakeResponse:
        self.sent.append((method, path, json, options))
        return FakeResponse(fake_km_answer() if json["kind"] == "km" else fake_cox_answer())


class FakeDisplay:
    """Stands in for IPython's ``display``: records what is shown, and each update of a shown output's handle."""

    def __init__(self) -> None:
        self.shown: list[Any] = []
        self.updates: list[dict[str, str]] = []

    def __call__(self, obj: Any, **options: Any) -> FakeDisplay:
        self.shown.append(obj)
        return self

    def update(self, bundle: dict[str, str], raw: bool = False) -> None:
        self.updates.append(bundle)
