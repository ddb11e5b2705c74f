"""Fakes of the notebook's side: FlipClient as the magics and the ``flip`` commands call it, and an HTML widget."""

from __future__ import annotations

from typing import Any


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
