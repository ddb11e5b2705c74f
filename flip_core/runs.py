"""A run as the hub keeps it: the task the coordinator validated and its ServerApp runs (:class:`Task`), and the
record of what ran, on what, by whom and what came out (:class:`RunRecord`).

A task crosses one boundary, the hub's loopback from the coordinator to its own ServerApp, so it is a body like
``flip_core.api``'s: strict, no unknown field, refused by :func:`~flip_core.parsing.parse` in a sentence naming
the field. A record lives long (in the hub's store, in ``flip run``'s ``records/RUN_ID.json``, in a notebook of
another version), so it is read leniently: its values were checked when they reached the hub and are only typed
here; a key it lacks (a run that made no model, a record of an earlier version) takes its default; a key this
version does not know is kept and written back, so a later version's field survives a trip through this one.
Its JSON (:meth:`RunRecord.as_dict`) holds the keys the record was given, as before these models.
"""

from __future__ import annotations

from collections.abc import ItemsView, KeysView, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from flip_core.api import (
    MAX_ROUNDS,
    MAX_SEED,
    MAX_SITES,
    MAX_SOURCE_CHARS,
    Body,
    ConfigKey,
    ConfigValue,
    DatasetAnnouncement,
    InclusionReport,
    MetricNames,
    Name,
    NodeId,
    NotebookInfo,
    SiteName,
)

Scalar = bool | int | float | str  # a --config value, as a record keeps it
Short = Annotated[str, StringConstraints(max_length=100)]  # a hash, a SHA-256, a strategy's name


class Recorded(BaseModel):
    """A part of a run record: frozen, lax (values are typed, never refused for their form), unknown keys kept."""

    model_config = ConfigDict(frozen=True, extra="allow")


# -- what a task and its record share ----------------------------------------------------------------
class AnnouncedInclusion(InclusionReport):
    """An imaging dataset's inclusion report as its site announced it, read leniently (inside a record)."""

    model_config = ConfigDict(strict=False, extra="allow")


class AnnouncedDataset(DatasetAnnouncement):
    """A dataset as its site announced it when the run began, read leniently (a record keeps it whole)."""

    model_config = ConfigDict(strict=False, extra="allow")
    inclusion: AnnouncedInclusion | None = None
    projects: list[str] = Field(default_factory=list, exclude=True)  # which projects the site admits: never recorded


class CohortSite(Recorded):
    """What one site released of a cohort when it froze it."""

    rows: int | None = Field(default=None, description="the cohort's rows there (None: withheld by the site)")
    hash: str = Field(default="", description="the keyed hash of the frozen rows")


class CohortRef(Recorded):
    """The cohort a run trains on, as the hub's book has it (``%flip_cohort``)."""

    name: str = Field(description="the cohort's name in its project")
    where: str = Field(default="", description="the filter that chose its rows")
    sites: dict[str, CohortSite] = Field(default_factory=dict, description="each site that froze it")


# -- the task -----------------------------------------------------------------------------------------
class TaskSite(Body):
    """A site that takes part in a run: its Flower node, the dataset as it announced it, its environment."""

    site: SiteName
    node_id: NodeId = Field(description="the site's Flower node when the run began")
    dataset: AnnouncedDataset = Field(description="the run's dataset as the site announced it")
    packages: Annotated[dict[Name, Name], Field(max_length=100)] = Field(
        default_factory=dict, description="the site's recorded package versions"
    )
    environment: Short = Field(default="", description="the hash of the site's installed package set")


class Task(Body):
    """``GET /internal/runs/ID/task``: what the coordinator validated of a ``TaskSpec`` and the ServerApp runs."""

    run_id: Short = Field(default="", description="the run's id ('' until the coordinator creates the run)")
    name: Name = Field(description="the run's name (--name, else 'run')")
    project: Name = Field(description="the project the run belongs to")
    researcher: Name = Field(description="who submitted it")
    source: Annotated[str, StringConstraints(max_length=MAX_SOURCE_CHARS)] = Field(description="the cell's source")
    source_hash: Short = Field(description="the hash of the cell's normalised source (flip_core.cell)")
    dataset: Name = Field(description="the dataset it trains on")
    rounds: int = Field(ge=1, le=MAX_ROUNDS, description="federated rounds (--rounds)")
    strategy: Short = Field(description="the aggregation strategy's name, lower case")
    strategy_options: Annotated[dict[ConfigKey, float], Field(max_length=20)] = Field(
        default_factory=dict, description="the --config keys the strategy reads, as numbers"
    )
    min_sites: int = Field(ge=1, le=MAX_SITES, description="the fewest sites the run may go on with")
    seed: int = Field(ge=0, le=MAX_SEED, description="the run's seed (each step's seed derives from it)")
    config: Annotated[dict[ConfigKey, ConfigValue], Field(max_length=300)] = Field(
        default_factory=dict, description="--config and the differential-privacy settings, as the sites read them"
    )
    initial_model: Short = Field(default="", description="the uploaded initial model's SHA-256 ('' when checked)")
    round_timeout: float | None = Field(default=None, gt=0, description="seconds a round waits for its sites")
    cohort: CohortRef | None = Field(default=None, description="the cohort it trains on (None: the whole table)")
    sites: Annotated[list[TaskSite], Field(min_length=1, max_length=MAX_SITES)] = Field(
        description="the taking sites, by name"
    )
    metrics: MetricNames | None = Field(
        default=None, description="the metric names it declared: no other leaves a site (None: each reads the cell's)"
    )
    covariates: dict[str, Any] | None = Field(
        default=None, description="the per-person table it asks of an OMOP dataset (flip_core.covariates), if any"
    )


# -- the record's own parts ---------------------------------------------------------------------------
class RecordedNotebook(NotebookInfo):
    """The notebook a task's cell came from (``flip run``), read leniently (inside a record)."""

    model_config = ConfigDict(strict=False, extra="allow")


class SiteEnvironment(Recorded):
    """A taking site's environment as it announced it."""

    packages: dict[str, str] = Field(default_factory=dict, description="its recorded packages' versions")
    hash: str = Field(default="", description="the hash of its installed package set")


class SiteUse(Recorded):
    """What a site said of its part in a run, in its last reply."""

    version: str = Field(default="", description="the site agent's FLIP version")
    fingerprint: str = Field(default="", description="the fingerprint of the dataset it read")
    train_rows: int | None = Field(default=None, description="rows in its training split")
    test_rows: int | None = Field(default=None, description="rows in its test split")
    device: str = Field(default="", description="where its steps ran ('cpu', 'cuda:0')")
    threads: int | None = Field(default=None, description="torch's thread count in its task process")


class StepBytes(Recorded):
    """The payloads one site received and sent in one step."""

    round: int = Field(description="the round (0: the initial model's evaluation)")
    phase: str = Field(description="the step's phase")
    received_bytes: int = Field(default=0, description="the step's payload the site received (the model)")
    sent_bytes: int = Field(default=0, description="the reply's payload the site sent back")


class MetricRow(Recorded):
    """One metric the run released: in a round, at a site (or 'global'), in a phase."""

    round: int = Field(description="the round (0: the initial model's evaluation)")
    site: str = Field(description="the site, or 'global' for the weighted mean over the sites")
    phase: str = Field(description="'train', 'evaluate', 'privacy', ...")
    metric: str = Field(description="the metric's name")
    value: float = Field(description="its value")


class RunRecord(Recorded):
    """A run's record: enough to repeat it, and to say why a rerun differs (``flip_core.records.compare``).

    Attributes are the typed way to read it. ``record["key"]`` and ``record.get("key")`` read :meth:`as_dict`, the
    record as JSON has it: the compatibility path for notebooks that read a record as a dict."""

    run_id: str = Field(description="the run's id")
    name: str = Field(description="the run's name ('MOCK ...' for a mock run)")
    project: str = Field(default="", description="the project it belongs to")
    researcher: str = Field(default="", description="who submitted it")
    dataset: str = Field(description="the dataset it trained on")
    rounds: int = Field(description="federated rounds")
    strategy: str = Field(default="", description="the aggregation strategy")
    strategy_options: dict[str, float] = Field(default_factory=dict, description="the options the strategy read")
    min_sites: int | None = Field(default=None, description="the fewest sites the run could go on with")
    round_timeout: float | None = Field(default=None, description="seconds a round waited for its sites")
    seed: int = Field(description="the run's seed")
    config: dict[str, Scalar] = Field(default_factory=dict, description="--config and the privacy settings")
    source_hash: str = Field(description="the hash of the cell's normalised source")
    sites: list[str] = Field(description="the sites that took part at the start")
    initial_model_sha256: str = Field(default="", description="the SHA-256 of the uploaded initial model")
    fab_sha256: str = Field(default="", description="the hash of the Flower bundle the hub submitted")
    created: float = Field(description="when the run was created (seconds since the epoch)")
    hub_packages: dict[str, str] = Field(default_factory=dict, description="the hub's recorded packages' versions")
    hub_environment: str = Field(default="", description="the hash of the hub's installed package set")
    client_packages: dict[str, str] = Field(default_factory=dict, description="the notebook kernel's packages")
    client_environment: str = Field(default="", description="the hash of the notebook kernel's package set")
    site_packages: dict[str, SiteEnvironment] = Field(default_factory=dict, description="each site's environment")
    site_datasets: dict[str, AnnouncedDataset] = Field(default_factory=dict, description="each site's dataset")
    cohort: CohortRef | None = Field(default=None, description="the cohort it trained on (None: the whole table)")
    covariates: dict[str, Any] | None = Field(default=None, description="the OMOP covariate specification it declared")
    notebook: RecordedNotebook | None = Field(default=None, description="its notebook, when `flip run` made it")
    seed_rule: str = Field(default="", description="how each step's seed derives from the run's seed")
    step_seeds: dict[str, list[int]] = Field(default_factory=dict, description="each site's seed, round by round")
    flower_run_id: int | None = Field(default=None, description="the Flower run that carried it")
    model_sha256: str | None = Field(default=None, description="the final model's SHA-256 (a completed run's)")
    site_info: dict[str, SiteUse] = Field(default_factory=dict, description="what each site used, as it said")
    failed_sites: dict[str, str] = Field(default_factory=dict, description="each site that dropped out, and why")
    traffic: dict[str, list[StepBytes]] = Field(default_factory=dict, description="each site's bytes, per step")
    aggregation_ordered: bool | None = Field(default=None, description="updates summed in the sites' order")
    history: list[MetricRow] = Field(default_factory=list, description="every metric released, in event order")
    epsilon_spent: dict[str, float] = Field(default_factory=dict, description="epsilon spent per site and 'global'")
    started: float | None = Field(default=None, description="when its sites began (the 'running' event)")
    status: str = Field(default="", description="its status when read ('' in a record as stored)")
    reason: str = Field(default="", description="why it failed or stopped")
    finished: float | None = Field(default=None, description="when it ended")
    mock: bool = Field(default=False, description="a --mock run, in the kernel over the sites' mocks")
    mock_rows: dict[str, int] = Field(default_factory=dict, description="a mock run's rows per site's mock")

    def as_dict(self) -> dict[str, Any]:
        """The record as JSON has it (on the wire, on disk): the keys it was given, each value as JSON."""
        return self.model_dump(mode="json", exclude_unset=True)

    def updated(self, **fields: Any) -> RunRecord:
        """This record with ``fields`` set (typed as when a record is read: a value of the wrong type is refused)."""
        return type(self).model_validate({**self.as_dict(), **fields})

    # -- the compatibility path: a record read as the dict it was before these models ---------------------
    def __getitem__(self, key: str) -> Any:
        return self.as_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.as_dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self.as_dict()

    def keys(self) -> KeysView[str]:
        return self.as_dict().keys()

    def items(self) -> ItemsView[str, Any]:
        return self.as_dict().items()


def record_of(view: Mapping[str, Any]) -> RunRecord:
    """The record in a run's view (what ``GET /api/runs/ID`` answers), typed."""
    return RunRecord.model_validate(view["record"])


__all__ = [
    "AnnouncedDataset",
    "AnnouncedInclusion",
    "CohortRef",
    "CohortSite",
    "MetricRow",
    "RecordedNotebook",
    "RunRecord",
    "SiteEnvironment",
    "SiteUse",
    "StepBytes",
    "Task",
    "TaskSite",
    "record_of",
]
