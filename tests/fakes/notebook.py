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
