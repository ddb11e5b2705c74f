"""The client checks a task's options with the coordinator's own typed request before anything is sent."""

from __future__ import annotations

import pytest

from flip_core.errors import RequestInvalid
from flip_core.util import free_port
from flip_magics.client import FlipClient

CELL = "def build_model(): pass\ndef train(m, d, c): pass\ndef evaluate(m, d, c): pass\n"


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"rounds": 0}, "--rounds must be between 1 and 10000, not 0"),
        ({"round_timeout": -2.0}, "--round-timeout must be between 0"),
        ({"dp_clip": 1.0}, "--dp-clip needs --dp-epsilon"),
        ({"config": {"dp_epsilon": 3}}, "--config dp_epsilon is reserved"),
        ({"seed": -1}, "--seed must be a whole number"),
    ],
)
def test_a_wrong_option_is_refused_in_the_kernel_without_reaching_the_coordinator(
    options: dict[str, object], said: str
) -> None:
    nowhere = FlipClient(f"http://127.0.0.1:{free_port()}", "token")  # nothing listens there
    with pytest.raises(RequestInvalid, match=said):
        nowhere.train(CELL, dataset="heart-disease", **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd': use one of"),
        ({"strategy": "fedyogi", "config": {"server_lr": "fast"}}, "--config server_lr must be a number"),
    ],
)
def test_a_mock_run_refuses_the_strategy_the_hub_would_refuse_before_anything_is_asked(
    options: dict[str, object], said: str
) -> None:
    nowhere = FlipClient(f"http://127.0.0.1:{free_port()}", "token")  # nothing listens there
    with pytest.raises(RequestInvalid, match=said):
        nowhere.train(CELL, dataset="heart-disease", mock=True, **options)  # type: ignore[arg-type]
