"""What %%flip_train's options become in the client API call (a fake client records the call)."""

from __future__ import annotations

from IPython.testing.globalipapp import get_ipython, start_ipython

from flip_magics.magics import FlipMagics

from fakes import FakeQueryClient, FakeTrainClient

SHELL = start_ipython() or get_ipython()  # the test shell, started once for the module


def test_privacy_options_reach_the_client(monkeypatch) -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = FakeTrainClient()  # type: ignore[assignment]
    monkeypatch.setattr("flip_magics.magics.show_run", lambda handle, **_: None)
    magics.flip_train("--dataset heart-disease --rounds 3 --dp-epsilon 2.5 --dp-clip 0.5 --out r", "def f(): pass\n")
    call = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (call["dp_epsilon"], call["dp_clip"], call["rounds"], call["dataset"]) == (2.5, 0.5, 3, "heart-disease")
    assert shell.user_ns["r"] == "handle"
    magics.flip_train("--dataset heart-disease", "def f(): pass\n")
    assert (magics.client.calls[-1]["dp_epsilon"], magics.client.calls[-1]["dp_clip"]) == (None, None)  # type: ignore[attr-defined]


def test_quoted_options_reach_the_client_without_their_quotes() -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = FakeQueryClient()  # type: ignore[assignment]
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
