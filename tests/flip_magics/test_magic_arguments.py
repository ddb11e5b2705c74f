"""What %%flip_train's options become in the client API call (a fake client records the call)."""

from __future__ import annotations

from typing import Any

from IPython.testing.globalipapp import get_ipython

from flip_magics.magics import FlipMagics


class RecordingClient:
    """A fake of FlipClient: records train()'s arguments instead of submitting."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def train(self, source: str, **options: Any) -> str:
        self.calls.append({"source": source, **options})
        return "handle"


def test_privacy_options_reach_the_client(monkeypatch) -> None:
    shell = get_ipython()
    magics = FlipMagics(shell)
    magics.client = RecordingClient()  # type: ignore[assignment]
    monkeypatch.setattr("flip_magics.magics.show_run", lambda handle: None)
    magics.flip_train("--dataset heart-disease --rounds 3 --dp-epsilon 2.5 --dp-clip 0.5 --out r", "def f(): pass\n")
    call = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (call["dp_epsilon"], call["dp_clip"], call["rounds"], call["dataset"]) == (2.5, 0.5, 3, "heart-disease")
    assert shell.user_ns["r"] == "handle"
    magics.flip_train("--dataset heart-disease", "def f(): pass\n")
    assert (magics.client.calls[-1]["dp_epsilon"], magics.client.calls[-1]["dp_clip"]) == (None, None)  # type: ignore[attr-defined]
