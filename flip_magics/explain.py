"""A run's failure at a site, re-run in this kernel on that site's mock (``FlipClient.explain_failure``).

A site tells the notebook only the fixed sentence of a failed step (``flip_core.cell.failed_step``: "RuntimeError at
cell line 28 in evaluate()"); the traceback, whose message could hold its data, stays at the site. :func:`site_failure`
reads that sentence back from the run's events; :func:`replay` runs the failing phase of the cell (its load,
``build_model()``, ``train()`` or ``evaluate()``) once on the site's mock, with the run's own initial model, config and
step seed; :func:`explain` says whether the mock failed the same way (the same exception type, cell line and phase)
and, where it did, gives the traceback from this kernel, labelled as the mock's. No IPython here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from flip_core.cell import CELL_FILENAME, cell_line, failed_step, seed_everything, step_seed
from flip_core.status import EventType, SiteState
from flip_core.vocabulary import PHASES, exception_name
from flip_magics.mock_run import MockCache, MockData, Part, cell_traceback, mock_split

LOAD = PHASES[0]  # "the cell": executing its source
# a failed step's sentence, as failed_step builds it: the exception's type, the cell's line (when known), the phase
_SENTENCE = re.compile(r"(?P<type>[A-Za-z_][A-Za-z0-9_]*)(?: at cell line (?P<line>[0-9]+))? in (?P<where>.+)")


@dataclass(frozen=True)
class SiteFailure:
    """A site's failed step as the notebook was told it."""

    site: str
    error_type: str
    line: int
    where: str  # one of flip_core.vocabulary.PHASES
    round: int

    @property
    def sentence(self) -> str:
        return failed_step(self.error_type, self.line, self.where)


@dataclass(frozen=True)
class MockOutcome:
    """The failing phase run once on the mock: how it failed (``error_type`` "" where it ran through)."""

    error_type: str = ""
    line: int = 0
    where: str = ""
    traceback: str = ""

    @property
    def sentence(self) -> str:
        return failed_step(self.error_type, self.line, self.where)


@dataclass(frozen=True)
class Explanation:
    """What the kernel can say of a site's failure from its mock: ``same`` where the mock failed the same way, with
    its ``traceback`` (from this kernel, on synthetic data); ``text``: what the notebook shows."""

    run_id: str
    site: str
    same: bool
    traceback: str
    text: str

    def __str__(self) -> str:
        return self.text


def site_failure(events: list[dict[str, Any]], site: str | None = None) -> SiteFailure | None:
    """The first failed step of the cell in a run's events (of ``site``, when given); None when no site's cell
    failed (the run completed, or stopped for another reason: a site offline, its data changed)."""
    for event in events:
        if event.get("type") != EventType.SITE or event.get("status") != SiteState.FAILED:
            continue
        if site is not None and event.get("site") != site:
            continue
        found = _SENTENCE.fullmatch(str(event.get("detail", "")))
        if found is not None and found["where"] in PHASES:
            line = int(found["line"] or 0)
            return SiteFailure(str(event["site"]), found["type"], line, found["where"], int(event.get("round") or 0))
    return None


def replay(
    source: str,
    failure: SiteFailure,
    mock: Part,
    *,
    dataset: str,
    seed: int,
    config: dict[str, Any],
    train_fraction: float,
    initial: dict[str, np.ndarray] | None,
) -> MockOutcome:
    """The cell's failing phase run once on ``mock`` (the site's), as the site ran it: the source executed afresh,
    the model built under the step's seed and given ``initial`` (None: as built), then ``train()`` or ``evaluate()``
    on the mock's split. How it failed, with its traceback; an empty outcome where it ran through."""
    where = LOAD
    try:
        namespace: dict[str, Any] = {"__name__": "__flip_task__"}
        exec(compile(source, CELL_FILENAME, "exec"), namespace)  # noqa: S102 - the researcher's own cell, here
        if failure.where == LOAD:
            return MockOutcome()
        where = PHASES[1]
        seed_everything(step_seed(seed, failure.round, failure.site))
        model = namespace["build_model"]()
        if initial is not None:
            import torch

            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in initial.items()})
        if failure.where == where:
            return MockOutcome()
        where = failure.where
        train, test = mock_split(mock, train_fraction, seed)
        data = MockData(
            train,
            test,
            failure.site,
            dataset,
            failure.round,
            global_params=dict(initial or {}),
            proximal_mu=float(config.get("proximal_mu", 0.0)),
            cache=MockCache(lambda _site: (train, test)),
        )
        namespace[where.removesuffix("()")](model, data, dict(config))
    except Exception as exc:  # noqa: BLE001 - the researcher's cell: how it fails is the answer
        return MockOutcome(exception_name(exc), cell_line(exc), where, cell_traceback(exc, source))
    return MockOutcome()


def explain(run_id: str, failure: SiteFailure, outcome: MockOutcome) -> Explanation:
    """Whether the mock failed as the site did (the same exception type, cell line and phase), in a sentence; where
    it did, the sentence then the mock's traceback."""
    site, ask = failure.site, f'%flip_request traceback {run_id} --site {failure.site} --purpose "..."'
    same = (outcome.error_type, outcome.line, outcome.where) == (failure.error_type, failure.line, failure.where)
    if same:
        traceback = outcome.traceback.rstrip("\n")
        text = (
            f"This is the traceback of the same failure on {site}'s MOCK data, in this kernel; the site's own "
            f"traceback stays at the site: ask for it with {ask}\n\n{traceback}"
        )
        return Explanation(run_id, site, True, traceback, text)
    if outcome.error_type:
        text = (
            f"On {site}'s MOCK data, in this kernel, the cell fails another way ({outcome.sentence}) than at the site "
            f"({failure.sentence}), so its mock does not show the site's failure: ask for the site's traceback with "
            f"{ask}"
        )
    else:
        text = (
            f"On {site}'s MOCK data, in this kernel, {failure.where} runs without failing, so the site's "
            f"{failure.sentence} comes from what differs there (its real data, which the mock does not copy, or its "
            f"packages): ask for the site's traceback with {ask}"
        )
    return Explanation(run_id, site, False, "", text)


def not_replayed(run_id: str, failure: SiteFailure, why: str) -> Explanation:
    """The sentence where the failure could not be re-run on the site's mock (the site sent none, say)."""
    text = f"{failure.site}'s {failure.sentence} could not be re-run on its MOCK data in this kernel: {why}"
    return Explanation(run_id, failure.site, False, "", text)
