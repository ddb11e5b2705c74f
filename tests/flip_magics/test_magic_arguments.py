"""What %%flip_train's options become in the client API call (a fake client records the call)."""

from __future__ import annotations

from typing import Any

from IPython.testing.globalipapp import get_ipython, start_ipython

from flip_magics.magics import FlipMagics

SHELL = start_ipython() or get_ipython()  # the test shell, started once for the module


class RecordingClient:
    """A fake of FlipClient: records train()'s arguments instead of submitting."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def train(self, source: str, **options: Any) -> str:
        self.calls.append({"source": source, **options})
        return "handle"


def test_privacy_options_reach_the_client(monkeypatch) -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = RecordingClient()  # type: ignore[assignment]
    monkeypatch.setattr("flip_magics.magics.show_run", lambda handle: None)
    magics.flip_train("--dataset heart-disease --rounds 3 --dp-epsilon 2.5 --dp-clip 0.5 --out r", "def f(): pass\n")
    call = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (call["dp_epsilon"], call["dp_clip"], call["rounds"], call["dataset"]) == (2.5, 0.5, 3, "heart-disease")
    assert shell.user_ns["r"] == "handle"
    magics.flip_train("--dataset heart-disease", "def f(): pass\n")
    assert (magics.client.calls[-1]["dp_epsilon"], magics.client.calls[-1]["dp_clip"]) == (None, None)  # type: ignore[attr-defined]


class RecordingQueries:
    """A fake of FlipClient's query side: records query() and cohort() instead of asking any site."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def query(self, *args: Any, **options: Any) -> str:
        self.calls.append(("query", args, options))
        return "result"

    def cohort(self, *args: Any, **options: Any) -> str:
        self.calls.append(("cohort", args, options))
        return "cohort"


def test_quoted_options_reach_the_client_without_their_quotes() -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = RecordingQueries()  # type: ignore[assignment]
    magics.flip_query('heart-disease count by sex, cp --where "age > 50 and sex = 1" --out q')
    kind, args, options = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert args == ("heart-disease", "count", ["sex", "cp"], "age > 50 and sex = 1")
    assert (
        options["text"] == "heart-disease count by sex, cp where age > 50 and sex = 1"
        and shell.user_ns["q"] == "result"
    )
    magics.flip_cohort("over50 --dataset 'heart-disease' --where 'age > 50'")
    assert magics.client.calls[-1][1] == ("over50", "heart-disease", "age > 50")  # type: ignore[attr-defined]
    magics.flip_query("heart-disease stats age", "age > 50\n  and sex = 1\n")  # the cell form: the cell is the filter
    assert magics.client.calls[-1][1][3] == "age > 50 and sex = 1"  # type: ignore[attr-defined]
