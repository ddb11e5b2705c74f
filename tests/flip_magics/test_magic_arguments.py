"""What %%flip_train's options become in the client API call (a fake client records the call)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from IPython.testing.globalipapp import get_ipython, start_ipython

from flip_core.airlock import ItemKind, Release
from flip_magics.airlock import ReleasedItem
from flip_magics.airlock_magics import AirlockMagics
from flip_magics.client import FlipClient
from flip_magics.magics import FlipMagics
from flip_magics.models import ModelResult
from flip_magics.survival import SurvivalResult

from fakes import FakeAirlockClient, FakeDisplay, FakeQueryClient, FakeTrainClient

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


def test_a_model_formula_reaches_the_client_whole_from_the_line_or_the_cell() -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = FakeQueryClient()  # type: ignore[assignment]
    magics.flip_model(
        "glm I(num > 0) ~ age + C(cp) --dataset heart-disease --family binomial --where 'age > 40' --out m"
    )
    kind, args, options = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (kind, args) == ("glm", ("I(num > 0) ~ age + C(cp)", "heart-disease", "binomial"))
    assert options["where"] == "age > 40" and options["sites"] is None
    assert list(shell.user_ns["m"].coefficients["name"]) == ["Intercept", "age"]
    assert shell.user_ns["m"].coefficients["odds_ratio"].iloc[1] == pytest.approx(1.6487, abs=1e-4)
    magics.flip_model("glm --dataset heart-disease --sites VA Hungary", "thalach ~ age\n + sex\n")
    assert magics.client.calls[-1][1][0] == "thalach ~ age + sex"  # type: ignore[attr-defined]
    assert magics.client.calls[-1][2]["sites"] == ["VA", "Hungary"]  # type: ignore[attr-defined]


def test_survival_options_reach_the_client_and_the_result_and_its_figure_are_shown(monkeypatch) -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = FakeQueryClient()  # type: ignore[assignment]
    shown = FakeDisplay()
    monkeypatch.setattr("flip_magics.magics.display", shown)
    magics.flip_survival(
        "km --dataset fake-trial --time days --event died --edges 0 30 60 90 --group arm --where 'age > 50' --out s"
    )
    kind, args, options = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (kind, args) == ("km", ("fake-trial", "days", "died", [0.0, 30.0, 60.0, 90.0]))
    assert options == {
        "group": "arm",
        "where": "age > 50",
        "cohort": None,
        "sites": None,
        "threshold": None,
        "covariates": None,
    }
    assert isinstance(shell.user_ns["s"], SurvivalResult) and shell.user_ns["s"].group == "arm"
    assert shown.shown[0] is shell.user_ns["s"] and shown.shown[1].data.startswith(b"\x89PNG")  # static: a PNG
    magics.flip_survival("km --dataset fake-trial --time days --event died --edges 0 30 --sites VA Hungary")
    assert magics.client.calls[-1][2]["sites"] == ["VA", "Hungary"] and "flip_survival" in shell.user_ns  # type: ignore[attr-defined]


def test_cox_terms_reach_the_client_whole_from_the_line_or_the_cell(monkeypatch) -> None:
    shell = SHELL
    magics = FlipMagics(shell)
    magics.client = FakeQueryClient()  # type: ignore[assignment]
    monkeypatch.setattr("flip_magics.magics.display", FakeDisplay())
    magics.flip_survival("cox age + C(arm) --dataset fake-trial --time days --event died --binned --edges 0 60 90")
    kind, args, options = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert (kind, args) == ("cox", ("age + C(arm)", "fake-trial", "days", "died"))
    assert options["binned"] is True and options["edges"] == [0.0, 60.0, 90.0] and options["where"] == ""
    model = shell.user_ns["flip_survival"]
    assert isinstance(model, ModelResult) and "hazard_ratio" in model.coefficients.columns
    magics.flip_survival("cox --dataset fake-trial --time days --event died --threshold 20", "age\n + C(arm)\n")
    kind, args, options = magics.client.calls[-1]  # type: ignore[attr-defined]
    assert args[0] == "age + C(arm)" and options["binned"] is False and options["edges"] is None
    assert options["threshold"] == 20


def test_a_wrong_survival_line_is_told_in_a_sentence_before_anything_is_asked() -> None:
    magics = FlipMagics(SHELL)
    fake = FakeQueryClient()
    magics.client = fake  # type: ignore[assignment]
    with pytest.raises(UsageError, match="Kaplan-Meier curves take --group, not terms"):
        magics.flip_survival("km age --dataset d --time days --event died --edges 0 30")
    with pytest.raises(UsageError, match="a Cox model takes terms"):
        magics.flip_survival("cox age --dataset d --time days --event died --group arm")
    with pytest.raises(UsageError, match="--time"):
        magics.flip_survival("km --dataset d --event died --edges 0 30")
    assert fake.calls == []
    magics.client = FlipClient("http://127.0.0.1:1", "token")  # the client's own checks, before any request
    with pytest.raises(UsageError, match="bin edges increase"):
        magics.flip_survival("km --dataset d --time days --event died --edges 30 10")
    with pytest.raises(UsageError, match="bin edges increase"):  # a stratified model's edges: its hazards check's
        magics.flip_survival("cox age --dataset d --time days --event died --edges 30 0")


def test_airlock_requests_reach_the_client_and_a_released_item_is_bound_as_its_object(capsys) -> None:
    shell = SHELL
    flip = FlipMagics(shell)
    shell.register_magics(flip)  # the airlock's magics use %flip_connect's client
    fake = FakeAirlockClient(ReleasedItem(_release(), b"Traceback: mat1 and mat2\n"))
    flip.client = fake  # type: ignore[assignment]
    airlock = AirlockMagics(shell)
    airlock.flip_request('traceback 9b68f1d026 --site Hungary --purpose "to see why evaluate() fails there"')
    assert fake.calls[-1] == (("traceback", "Hungary", "to see why evaluate() fails there"), {"run": "9b68f1d026"})
    assert "is pending" in capsys.readouterr().out and shell.user_ns["flip_request"].request_id == "rq-0000000001"
    airlock.flip_request("query heart-disease count by sex --where 'age > 70' --site VA --purpose 'our table 1 here'")
    args, options = fake.calls[-1]
    assert options["query"]["columns"] == ["sex"] and options["query"]["where"] == "age > 70"
    assert options["query"]["kind"] == "count" and args[1] == "VA"
    with pytest.raises(UsageError, match="takes the run's id"):
        airlock.flip_request("traceback a b --site VA --purpose 'four words of purpose'")
    listing = airlock.flip_requests("")
    assert list(listing["state"]) == ["refused"] and list(listing["reason"]) == ["too much"]
    assert airlock.flip_released("rq-0000000001 --out tb") is None  # a traceback is printed and bound as text
    assert shell.user_ns["tb"] == "Traceback: mat1 and mat2\n" and "released by Hungary" in capsys.readouterr().out


def _release() -> Release:
    return Release(
        "rq-0000000001", "Hungary", ItemKind.TRACEBACK, "text/plain", "sha256:x", 25, "ada", "p", "why", 0.0, "c", "k"
    )
