"""Differential privacy at the site: the noise on what leaves, and the project's budget.

A run that asks for it (``--dp-epsilon E --dp-clip C``) gets, at every site, the guarantee
that its whole run is (E, delta)-differentially private with respect to the site's data, where
delta is the site's (``[projects.NAME] dp_delta``, default 1e-5). The site enforces it itself,
trusting nothing from the hub:

- each round's update (trained parameters minus the global ones the site received) is clipped
  to L2 norm C over all floating-point arrays together, and Gaussian noise of standard deviation
  ``2 C z`` is added to every coordinate: any change to the site's data, one record or all of
  them, moves the clipped update by at most 2C, so this is the Gaussian mechanism with noise
  multiplier z;
- non-float arrays (counters such as BatchNorm's ``num_batches_tracked``) leave as received;
- metrics and row counts computed on the data do not leave at all (they would spend budget the
  accountant does not see); the update is weighted as one site among equals;
- z is the smallest noise multiplier for which a Rényi-DP accountant (Flower's ``RdpAccountant``
  over Google's ``dp-accounting``, no sampling amplification: every site takes part in every
  round) puts the run's rounds at no more than E.

Every release is charged to the project's ledger at the site (``privacy/<project>.json``): the
accountant composes all of the project's releases, across runs, and the site refuses a task that
would take the project past ``max_epsilon`` (``site_agent.governance.policy``). A project whose
queries the site answers under differential privacy (``query_epsilon``, ``site_agent.queries.private``)
spends the same budget: each query is pure epsilon-DP and is added to the training runs' epsilon as it
is (basic composition: (e1, delta) and (e2, 0) make (e1 + e2, delta)).
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_DELTA = 1e-5
MAX_NOISE_MULTIPLIER = 1e4


def _accountant(delta: float) -> Any:
    # Flower's accountant loads dp-accounting (scipy, mpmath) when first used: only runs that ask for DP pay it
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

    return RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )


def _event(noise_multiplier: float) -> Any:
    from flwr.serverapp import GaussianPrivacyEvent

    return GaussianPrivacyEvent(noise_multiplier=noise_multiplier, sample_size=1, population_size=1)


def epsilon(releases: list[tuple[float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of the composed releases, each (noise multiplier, how many)."""
    if not releases:
        return 0.0
    accountant = _accountant(delta)
    for z, count in releases:
        accountant.compose(_event(z), count)
    return float(accountant.get_epsilon(delta))


@lru_cache(maxsize=256)
def noise_multiplier(target_epsilon: float, delta: float, releases: int) -> float:
    """The least noise multiplier (to 0.1 %) for which ``releases`` Gaussian releases spend at most
    ``target_epsilon`` at ``delta``."""
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"epsilon must be a positive number, not {target_epsilon!r}")
    if releases < 1:
        raise ValueError("a run releases at least once")
    low, high = 1e-3, 1.0
    while epsilon([(high, releases)], delta) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {target_epsilon:g} over {releases} round(s) is too small to reach")
    while high / low > 1.001:
        middle = math.sqrt(low * high)
        if epsilon([(middle, releases)], delta) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


def privatise(
    params: dict[str, np.ndarray], received: dict[str, np.ndarray], clip: float, z: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``received`` plus the clipped, noised update ``params - received`` (see the module's docstring)."""
    floats = [name for name, value in received.items() if np.issubdtype(np.asarray(value).dtype, np.floating)]
    deltas = {name: params[name].astype(np.float64) - received[name].astype(np.float64) for name in floats}
    norm = math.sqrt(sum(float(np.square(d).sum()) for d in deltas.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    std = 2.0 * clip * z
    out = {name: np.array(value, copy=True) for name, value in received.items()}
    for name, delta in deltas.items():
        noisy = received[name].astype(np.float64) + delta * scale + rng.normal(0.0, std, size=delta.shape)
        out[name] = noisy.astype(received[name].dtype)
    return out


@dataclass(frozen=True)
class Spend:
    """A project's privacy budget at this site: spent so far, and after a task's releases."""

    spent: float
    after: float


class PrivacyLedger:
    """Each project's releases at this site, one JSON file per project, appended under a lock."""

    def __init__(self, site_dir: Path) -> None:
        self.folder = Path(site_dir) / "privacy"

    def _path(self, project: str) -> Path:
        return self.folder / f"{project}.json"

    def releases(self, project: str) -> list[dict[str, Any]]:
        path = self._path(project)
        if not path.exists():
            return []
        return list(json.loads(path.read_text())["releases"])

    def _composed(self, project: str, run: str | None = None) -> list[tuple[float, int]]:
        return [
            (float(r["noise_multiplier"]), 1)
            for r in self.releases(project)
            if "noise_multiplier" in r and run in (None, r.get("run"))
        ]

    def _queried(self, project: str) -> float:
        """The epsilon the project's queries spent here (each pure epsilon-DP: they add up)."""
        return sum(float(r["epsilon"]) for r in self.releases(project) if "query" in r)

    def spend(self, project: str, delta: float, z: float | None = None, count: int = 0, query: float = 0.0) -> Spend:
        """Epsilon spent by ``project`` here, and what it would be after ``count`` more releases at ``z`` (or one
        more query of epsilon ``query``)."""
        done, queried = self._composed(project), self._queried(project)
        spent = epsilon(done, delta) + queried
        after = epsilon(done + [(z, count)], delta) + queried if z is not None and count > 0 else spent
        return Spend(spent, after + query)

    def run_spent(self, project: str, run: str, delta: float) -> float:
        """Epsilon spent here by one run of ``project``."""
        return epsilon(self._composed(project, run), delta)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def charge(self, project: str, run: str, round_: int, z: float) -> None:
        """Record one release of ``project`` (written before anything leaves)."""
        self._append(project, {"run": run, "round": round_, "noise_multiplier": z, "time": time.time()})

    def charge_query(self, project: str, query: str, spent: float) -> None:
        """Record one query of ``project`` answered under differential privacy (before its answer leaves)."""
        self._append(project, {"query": query, "epsilon": float(spent), "time": time.time()})

    def _append(self, project: str, release: dict[str, Any]) -> None:
        with self._locked():
            releases = [*self.releases(project), release]
            tmp = self._path(project).with_suffix(".tmp")
            tmp.write_text(json.dumps({"project": project, "releases": releases}, indent=1))
            tmp.replace(self._path(project))
