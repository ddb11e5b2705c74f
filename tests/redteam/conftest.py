"""The red team's federation, shared by every attack in this folder (``kit`` says what an attack asserts)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flip_core.util import wait_until
from flip_local.sites import local_policy

from helpers import local_federation
from kit import (
    MEMORY_LIMIT_MB,
    NOISY_PROJECT,
    PRIVATE_PROJECT,
    PRIVATE_QUERIES,
    RUNS_LIMIT,
    SECOND_PROJECT,
    SITES,
    RedTeam,
)


@pytest.fixture(scope="session")
def redteam(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedTeam]:
    home = tmp_path_factory.mktemp("flip-redteam")
    policy = local_policy()  # the development policy, with a run's memory at 2 GiB
    policy["projects"]["default"]["memory_limit_mb"] = MEMORY_LIMIT_MB
    policy["policy"]["runs_limit"] = RUNS_LIMIT  # and two runs at once (an attack passes it with three)
    policy["projects"][SECOND_PROJECT] = dict(policy["projects"]["default"])  # where a researcher is in two
    # counts leave exact in those two, so that the ledger and the rules are attacked alone; they move (cell-key
    # perturbation, as by default) in a third, whose attacks are on what the moves are to hide
    policy["policy"]["count_noise"] = 0
    policy["projects"][NOISY_PROJECT] = {**policy["projects"]["default"], "count_noise": 2}
    # and one whose queries the sites answer under differential privacy, each spending 1 of a budget of a few
    policy["projects"][PRIVATE_PROJECT] = {
        **policy["projects"]["default"],
        "query_epsilon": 1.0,
        "max_epsilon": float(PRIVATE_QUERIES),
    }
    with local_federation(home, sites=len(SITES), policy=policy) as connection:
        team = RedTeam(home, connection)
        client = team.client()
        assert wait_until(lambda: len([s for s in client.sites() if s["status"] == "online"]) == len(SITES), 60)
        yield team
