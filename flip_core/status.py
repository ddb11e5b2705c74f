"""The statuses and kinds that cross a process boundary, each as an enum.

They are ``StrEnum``s: a member compares equal to its text and is written to JSON as it, so a
run record, an event or a step header reads the same as before there were enums, and a text
that is not a member is refused where it is read (``Enum(value)`` raises ``ValueError``).
"""

from __future__ import annotations

from enum import StrEnum


class StepStatus(StrEnum):
    """How one step ended at one site (``StepResult.status``)."""

    OK = "ok"
    ERROR = "error"  # the cell or its task process failed; the result says where, never the message
    NO_DATASET = "no-dataset"  # the site does not hold the dataset
    REFUSED = "refused"  # the site's policy refused the step
    PENDING = "pending"  # the site's admin has not yet approved the task's code
    SUPPRESSED = "suppressed"  # disclosure control withheld the result


class Phase(StrEnum):
    """Which part of a round a step is."""

    PREPARE = "prepare"  # start the run's task process (cell, split) and evaluate the initial model
    FIT = "fit"  # evaluate the incoming global model (from round 2: prepare evaluated round 1's), then train
    EVALUATE = "evaluate"  # the final evaluation of the final model


class RunStatus(StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"


TERMINAL: frozenset[str] = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED})


class SiteState(StrEnum):
    """A site's state within a run, as the notebook's site table shows it."""

    WAITING = "waiting"
    WAITING_APPROVAL = "waiting-approval"
    PREPARING = "preparing"
    READY = "ready"
    TRAINING = "training"
    EVALUATING = "evaluating"
    DONE = "done"
    LATE = "late"
    FAILED = "failed"
    REJOINED = "rejoined"


# A site in one of these states has a message waiting for it on the SuperLink: ring its doorbell.
DISPATCHED: frozenset[str] = frozenset({SiteState.PREPARING, SiteState.TRAINING, SiteState.EVALUATING})


class EventType(StrEnum):
    """The kinds of event a run streams to notebooks."""

    RUN = "run"
    SITE = "site"
    METRICS = "metrics"
    ROUND = "round"


class MetricPhase(StrEnum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    PRIVACY = "privacy"


class Presence(StrEnum):
    """A site agent's own word on whether it is reachable (its announcement)."""

    ONLINE = "online"
    OFFLINE = "offline"


__all__ = [
    "DISPATCHED",
    "TERMINAL",
    "EventType",
    "MetricPhase",
    "Phase",
    "Presence",
    "RunStatus",
    "SiteState",
    "StepStatus",
]
