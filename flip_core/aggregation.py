"""The strategies' arithmetic, shared by the hub's round loop and the notebook's mock run: FedAvg, FedProx,
FedAdam and FedYogi, the example-weighted mean of the sites' updates and of their metrics.

Pure numpy, no I/O. Model parameters are ``dict[str, np.ndarray]`` ordered like a
torch ``state_dict``; a site update is ``(parameters, example_count)``.

The adaptive strategies follow Reddi et al. 2021, "Adaptive Federated Optimization",
as Flower's ``FedAdam`` / ``FedYogi`` strategies implement it (no bias correction)::

    delta = weighted_mean(updates) - current
    m = beta1 * m + (1 - beta1) * delta
    v = beta2 * v + (1 - beta2) * delta**2                          # Adam
    v = v - (1 - beta2) * delta**2 * sign(v - delta**2)             # Yogi
    new = current + eta * m / (sqrt(v) + tau)

A run names its strategy (``--strategy``) and may set the options it reads in its ``--config``
(:data:`STRATEGY_OPTIONS`); :func:`strategy_for` builds it from those, as the hub and the mock run both do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from flip_core.errors import RequestInvalid

Params = dict[str, np.ndarray]
Update = tuple[Params, int]

STRATEGIES = {"fedavg", "fedprox", "fedadam", "fedyogi"}
STRATEGY_OPTIONS = ("server_lr", "beta1", "beta2", "tau", "proximal_mu")  # --config keys the strategy reads


def _check_same_layout(
    reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], what: str, ref_what: str = "the first update"
) -> None:
    """Raise ValueError unless ``other`` has the same array names and shapes as ``reference``."""
    missing = [k for k in reference if k not in other]
    extra = [k for k in other if k not in reference]
    if missing or extra:
        raise ValueError(
            f"Parameter names differ between {what} and {ref_what}: missing {missing}, unexpected {extra}."
        )
    for key, ref in reference.items():
        if np.shape(ref) != np.shape(other[key]):
            raise ValueError(
                f"Array {key!r} has shape {np.shape(other[key])} in {what} but shape {np.shape(ref)} in {ref_what}."
            )


def _cast_back(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast a float64 result back to ``dtype``, rounding for integer and bool dtypes."""
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        values = np.rint(values)
    return values.astype(dtype, copy=False)


ORDERED_BYTES = 64 << 20  # updates up to this much in all are folded in the sites' order, not as they arrive
CHUNK = 1 << 20  # elements of an array folded in at a time: float64 temporaries stay small (8 MB)


class RunningMean:
    """The example-weighted mean of updates folded in as replies arrive (float64 sums).

    Float sums depend on their order, so replies are folded in the order of their keys (the sites' names)
    while they are small: up to ``ORDERED_BYTES`` of updates wait for :meth:`mean`, which folds them sorted,
    and a rerun that gets the same replies in another order gets the same bits. Beyond that the hub folds each
    update as it comes and then lets the reply go, holding one float64 sum per array rather than every site's
    copy of the model; ``ordered`` then turns False (the run record says so: such a mean may differ in its last
    bits between runs). Each array is folded in chunks of ``CHUNK`` elements, so no full-size temporary is
    made. The mean keeps the dtype of the first update's array (integer arrays are rounded). ``add`` raises
    ValueError for a negative or non-finite weight or an update whose array names or shapes differ from the
    first; ``mean`` for no updates or a total weight of 0.
    """

    def __init__(self, ordered_bytes: int | None = None) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, np.dtype] = {}
        self.layout: Params | None = None
        self.total = 0.0
        self.count = 0
        self.limit = ORDERED_BYTES if ordered_bytes is None else ordered_bytes
        self.waiting: list[tuple[str, int, Params, float]] = []  # (key, arrival, update, weight)
        self.waiting_bytes = 0
        self.ordered = True

    def add(self, params: Params, weight: float, key: str = "") -> None:
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Update {self.count} has weight {weight!r}; weights must be finite and >= 0.")
        if self.layout is None:  # shapes only: the first reply's bytes are not kept
            self.layout = {k: _shape_only(v) for k, v in params.items()}
            self.dtypes = {k: np.asarray(v).dtype for k, v in params.items()}
            self.sums = {k: np.zeros(np.shape(v), dtype=np.float64) for k, v in params.items()}
        else:
            _check_same_layout(self.layout, params, f"update {self.count}")
        self.count += 1
        if not weight:
            return
        self.total += float(weight)
        size = sum(np.asarray(v).nbytes for v in params.values())
        if self.ordered and self.waiting_bytes + size <= self.limit:
            self.waiting.append((key, self.count, params, float(weight)))
            self.waiting_bytes += size
            return
        self.ordered = False  # too large to hold: from now on in arrival order
        self._fold_waiting()
        self._fold(params, weight)

    def _fold_waiting(self) -> None:
        for _, _, params, weight in sorted(self.waiting, key=lambda w: (w[0], w[1])):
            self._fold(params, weight)
        self.waiting, self.waiting_bytes = [], 0

    def _fold(self, params: Params, weight: float) -> None:
        for key, acc in self.sums.items():
            flat, values = acc.reshape(-1), np.asarray(params[key]).reshape(-1)
            for start in range(0, flat.size, CHUNK):
                part = values[start : start + CHUNK].astype(np.float64)
                part *= weight
                flat[start : start + CHUNK] += part

    def mean(self) -> Params:
        self._fold_waiting()
        if not self.count:
            raise ValueError("Cannot aggregate an empty list of updates.")
        if self.total == 0:
            raise ValueError("The total weight of the updates is 0, so there is nothing to average.")
        result: Params = {}
        for key, acc in self.sums.items():
            acc /= self.total  # in place: the sums are not used again
            result[key] = _cast_back(acc, self.dtypes[key])
        self.sums = {}
        return result


def _shape_only(array: np.ndarray) -> np.ndarray:
    """A zero-strided stand-in with ``array``'s shape: the layout check needs shapes, not the bytes."""
    return np.broadcast_to(np.zeros((), dtype=np.asarray(array).dtype), np.shape(array))


def weighted_mean(updates: list[Update]) -> Params:
    """Example-count-weighted mean of each array, computed in float64 (:class:`RunningMean` over ``updates``)."""
    running = RunningMean()
    for params, weight in updates:
        running.add(params, weight)
    return running.mean()


def weighted_metrics(results: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """Per-metric mean weighted by example count, over the results that report the metric.

    Non-finite (or non-numeric) values are skipped, as are results with weight 0; a metric
    reported by no result with positive weight is omitted. Negative weights raise ValueError.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for i, (metrics, weight) in enumerate(results):
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"Result {i} has weight {weight!r}; weights must be finite and >= 0.")
        if weight == 0:
            continue
        for name, value in metrics.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(number):
                continue
            sums[name] = sums.get(name, 0.0) + number * weight
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sums}


class Strategy:
    """Base server strategy: plain FedAvg. Subclasses override :meth:`aggregate`."""

    name = "fedavg"

    def __init__(self, options: Mapping[str, float] | None = None) -> None:
        self.options: dict[str, float] = dict(options or {})

    def client_config(self) -> dict[str, float]:
        """Extra settings the sites need for local training (empty unless FedProx)."""
        return {}

    def aggregate(self, current: Params, updates: list[Update]) -> Params:
        """Return the new global parameters from ``current`` and the site updates."""
        return self.step(current, weighted_mean(updates))

    def step(self, current: Params, mean: Params) -> Params:
        """The new global parameters from ``current`` and the updates' weighted ``mean`` (:class:`RunningMean`)."""
        _check_same_layout(mean, current, "the current global parameters", "the updates")
        return mean

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017): the example-weighted mean."""

    name = "fedavg"


class FedProx(Strategy):
    """FedProx (Li et al. 2020): server side is FedAvg; sites add a proximal term mu/2*||w-w0||^2."""

    name = "fedprox"

    def __init__(self, options: Mapping[str, float] | None = None) -> None:
        super().__init__(options)
        self.proximal_mu = float(self.options.get("proximal_mu", 0.01))
        if not math.isfinite(self.proximal_mu) or self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be a finite number >= 0, not {self.proximal_mu!r}.")

    def client_config(self) -> dict[str, float]:
        return {"proximal_mu": self.proximal_mu}


class _Adaptive(Strategy):
    """Shared FedOpt machinery; subclasses define the second-moment update."""

    defaults: dict[str, float] = {}

    def __init__(self, options: Mapping[str, float] | None = None) -> None:
        super().__init__(options)
        merged = {k: float(self.options.get(k, d)) for k, d in self.defaults.items()}
        self.eta, self.beta1 = merged["server_lr"], merged["beta1"]
        self.beta2, self.tau = merged["beta2"], merged["tau"]
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step(self, current: Params, mean: Params) -> Params:
        _check_same_layout(mean, current, "the current global parameters", "the updates")
        new: Params = {}
        for key, avg in mean.items():
            cur = np.asarray(current[key])
            if not np.issubdtype(cur.dtype, np.floating):
                new[key] = avg
                continue
            delta = np.asarray(avg, dtype=np.float64) - cur.astype(np.float64)
            m = self.m.get(key)
            v = self.v.get(key)
            if m is None or v is None or m.shape != delta.shape:
                m, v = np.zeros_like(delta), np.zeros_like(delta)
            m = self.beta1 * m + (1.0 - self.beta1) * delta
            v = self._second_moment(v, delta * delta)
            self.m[key], self.v[key] = m, v
            step = self.eta * m / (np.sqrt(v) + self.tau)
            new[key] = (cur.astype(np.float64) + step).astype(cur.dtype)
        return new


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al. 2021) with Flower's defaults."""

    name = "fedadam"
    defaults = {"server_lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-9}

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al. 2021) with Flower's defaults."""

    name = "fedyogi"
    defaults = {"server_lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}

    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray:
        return np.asarray(v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq))


_REGISTRY: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
}


def make_strategy(name: str, options: dict[str, float] | None = None) -> Strategy:
    """Build the strategy called ``name`` (case-insensitive) with ``options``."""
    cls = _REGISTRY.get(name.strip().lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"Unknown strategy {name!r}; valid strategies are: {', '.join(sorted(STRATEGIES))}.")
    return cls(options)


def strategy_options(config: Mapping[str, Any]) -> dict[str, float]:
    """The options a strategy reads from a run's ``--config`` (:data:`STRATEGY_OPTIONS`), as numbers; one that is
    not a number is refused (:class:`RequestInvalid`) in a sentence naming it."""
    if wrong := [k for k in STRATEGY_OPTIONS if k in config and isinstance(config[k], (bool, str))]:
        raise RequestInvalid(f"--config {wrong[0]} must be a number, not {config[wrong[0]]!r}", "config")
    return {k: float(config[k]) for k in STRATEGY_OPTIONS if k in config}


def strategy_for(name: str, config: Mapping[str, Any]) -> Strategy:
    """The strategy a run names (``--strategy``, case-insensitive) with the options its ``--config`` sets, as the
    hub runs it; an unknown strategy or a wrong option is refused (:class:`RequestInvalid`) in a sentence."""
    strategy = name.lower()
    if strategy not in STRATEGIES:
        raise RequestInvalid(f"unknown strategy {strategy!r}: use one of {', '.join(sorted(STRATEGIES))}", "strategy")
    try:
        return make_strategy(strategy, strategy_options(config))
    except ValueError as exc:
        raise RequestInvalid(f"--config {exc}", "config") from None


__all__ = [
    "STRATEGIES",
    "STRATEGY_OPTIONS",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "Params",
    "RunningMean",
    "Strategy",
    "Update",
    "make_strategy",
    "strategy_for",
    "strategy_options",
    "weighted_mean",
    "weighted_metrics",
]
