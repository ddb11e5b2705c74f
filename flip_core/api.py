"""The coordinator's HTTP contract: header names, limits, and the typed body of every route.

Each body a route accepts is parsed into one of these frozen models before anything else looks
at it (:func:`parse`): a missing, mistyped, out-of-range, oversized or unknown field is refused
with a :class:`~flip_core.errors.RequestInvalid` whose sentence names the field. The notebook's
client builds the same models, so a wrong value is caught in the kernel before it is sent.
Models are pydantic's (strict: ``"3"`` is not a number, ``true`` is not ``1``); the sentences are
FLIP's own.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flip_core.airlock import MAX_PURPOSE_CHARS, ItemKind, purpose_problem
from flip_core.covariates import CovariateSpec
from flip_core.parsing import parse, sentence
from flip_core.query import ELSEWHERE, MAX_BINS, MAX_COLUMNS, MAX_QUERY_CHARS, TOP_DOMAINS, QueryKind
from flip_core.status import MetricPhase, Phase, Presence, RunStatus, SiteState, StepStatus
from flip_core.vocabulary import MAX_METRICS, METRIC_RULE, is_metric_name

PROJECT_HEADER = "X-FLIP-Project"  # a researcher in several projects names the one a request is for

MAX_CIRCE_CHARS = 200_000  # an ATLAS cohort export; the sites refuse their own way what they cannot render
MAX_JSON_BYTES = 8 << 20  # a task (its cell source included) or a batch of events
MAX_SOURCE_CHARS = 1 << 20
MAX_ROUNDS = 10_000
MAX_ROUND_TIMEOUT = 7 * 24 * 3600.0
MAX_DP_EPSILON = 100.0
MAX_SEED = 2**63 - 1
MAX_SITES = 10_000
MAX_EVENTS = 10_000
MAX_CONFIG_ENTRIES = 200
NAME_CHARS = 200
TEXT_CHARS = 10_000
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")  # as `flip site register` allows


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("flip", message)


def _site_name(name: str) -> str:
    if not SITE_NAME.fullmatch(name):
        raise _refuse(f"{name[:70]!r} is not a site name (letters, digits, '.', '_' and '-', at most 64)")
    return name


def _sha256(digest: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise _refuse(f"{digest[:70]!r} is not a model's SHA-256 (64 lower-case hex digits)")
    return digest


def _environment_hash(digest: str) -> str:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
        raise _refuse(f"{digest[:70]!r} is not an environment's hash ('sha256:' and 64 lower-case hex digits)")
    return digest


def _cohort_name(name: str) -> str:
    if not SITE_NAME.fullmatch(name):
        raise _refuse(f"{name[:70]!r} is not a cohort name (letters, digits, '.', '_' and '-', at most 64)")
    return name


def _metric_name(name: str) -> str:
    if not is_metric_name(name):
        raise _refuse(f"--metrics: {name[:70]!r} is not a metric name ({METRIC_RULE})")
    return name


def _metric_names(names: list[str]) -> list[str]:
    if len(set(names)) != len(names):
        raise _refuse("--metrics names a metric twice")
    return names


Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_CHARS)]
MetricName = Annotated[str, AfterValidator(_metric_name)]
# the metric names a task declares before it runs: no other leaves a site (flip_core.vocabulary)
MetricNames = Annotated[list[MetricName], Field(max_length=MAX_METRICS), AfterValidator(_metric_names)]
CohortName = Annotated[str, AfterValidator(_cohort_name)]
Text = Annotated[str, StringConstraints(max_length=TEXT_CHARS)]
SiteName = Annotated[str, AfterValidator(_site_name)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
EnvironmentHash = Annotated[str, AfterValidator(_environment_hash)]
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]
NodeId = Annotated[int, Field(ge=0, le=2**64 - 1)]  # Flower's node ids are unsigned 64-bit
ConfigValue = bool | int | float | Annotated[str, StringConstraints(max_length=TEXT_CHARS)]
ConfigKey = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Lax = Field(strict=False)  # an enum: its text is accepted from JSON and from Python alike


class Body(BaseModel):
    """A request body: frozen, strict, no unknown fields, no NaN or infinity."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)


# -- researchers ------------------------------------------------------------------------------------
class NotebookInfo(Body):
    """The notebook a task's cell came from, as ``flip run`` executed it: enough to run it again."""

    path: Annotated[str, StringConstraints(max_length=4096)] = ""
    sha256: Annotated[str, StringConstraints(max_length=100)] = ""  # of the notebook file as it was executed
    parameters: Annotated[dict[ConfigKey, ConfigValue], Field(max_length=MAX_CONFIG_ENTRIES)] = Field(
        default_factory=dict
    )
    execution: Annotated[str, StringConstraints(max_length=100)] = ""  # one `flip run`: its runs share it
    cell: int = Field(default=0, ge=0, le=100_000)  # the task's place among the execution's tasks (1, 2, ...)


class TaskSpec(Body):
    """``POST /api/runs`` and ``POST /api/runs/check``: a ``%%flip_train`` cell and its options.

    The messages name the options as the researcher typed them (``--rounds``); the field names are
    the same words. Whether the dataset exists, enough sites are online, the strategy is known and the
    model was uploaded is the coordinator's to say (it knows the federation)."""

    source: Annotated[str, StringConstraints(max_length=MAX_SOURCE_CHARS)]
    dataset: Name
    rounds: int = 1
    strategy: Annotated[str, StringConstraints(min_length=1, max_length=40)] = "fedavg"
    min_sites: int | None = None
    seed: int = 0
    name: Annotated[str, StringConstraints(max_length=NAME_CHARS)] | None = None
    config: Annotated[dict[ConfigKey, ConfigValue], Field(max_length=MAX_CONFIG_ENTRIES)] = Field(default_factory=dict)
    round_timeout: float | None = None
    dp_epsilon: float | None = None
    dp_clip: float | None = None
    initial_model: Sha256 | None = None  # the uploaded model's SHA-256 (not yet known to /api/runs/check)
    cohort: CohortName | None = None  # train on the rows this cohort froze at each site (%flip_cohort)
    client_packages: Annotated[dict[Name, Name], Field(max_length=100)] = Field(default_factory=dict)
    client_environment: EnvironmentHash | None = None  # the notebook kernel's installed package set, hashed
    notebook: NotebookInfo | None = None  # set when the cell ran under `flip run`
    # the metric names train() and evaluate() return (--metrics, or the kernel's reading of the cell); None: the hub
    # reads them from the source (flip_core.cell.declared_metrics). No other name leaves a site.
    metrics: MetricNames | None = None
    covariates: CovariateSpec | None = None  # an OMOP dataset's per-person table, declared (flip_core.covariates)

    @field_validator("source")
    @classmethod
    def _has_code(cls, source: str) -> str:
        if not source.strip():
            raise _refuse("the task has no source: the cell must define build_model, train and evaluate")
        return source

    @field_validator("rounds")
    @classmethod
    def _rounds(cls, rounds: int) -> int:
        if not 1 <= rounds <= MAX_ROUNDS:
            raise _refuse(f"--rounds must be between 1 and {MAX_ROUNDS}, not {rounds}")
        return rounds

    @field_validator("min_sites")
    @classmethod
    def _min_sites(cls, min_sites: int | None) -> int | None:
        if min_sites is not None and not 1 <= min_sites <= MAX_SITES:
            raise _refuse(f"--min-sites must be at least 1 (and at most {MAX_SITES}), not {min_sites}")
        return min_sites

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int) -> int:
        if not 0 <= seed <= MAX_SEED:
            raise _refuse(f"--seed must be a whole number from 0 to 2**63-1, not {seed}")
        return seed

    @field_validator("round_timeout")
    @classmethod
    def _round_timeout(cls, timeout: float | None) -> float | None:
        if timeout is not None and not 0 < timeout <= MAX_ROUND_TIMEOUT:
            raise _refuse(f"--round-timeout must be between 0 and {MAX_ROUND_TIMEOUT:.0f} seconds, not {timeout:g}")
        return timeout

    @field_validator("config", mode="before")
    @classmethod
    def _scalars(cls, config: Any) -> Any:
        if isinstance(config, dict) and not all(isinstance(v, (str, int, float, bool)) for v in config.values()):
            raise _refuse("--config values must be numbers, booleans or strings")
        return config

    @field_validator("config")
    @classmethod
    def _config(cls, config: dict[str, Any]) -> dict[str, Any]:
        if reserved := sorted(k for k in config if k.startswith("dp_")):
            raise _refuse(f"--config {reserved[0]} is reserved: use --dp-epsilon and --dp-clip")
        return config

    @model_validator(mode="after")
    def _privacy(self) -> TaskSpec:
        if self.dp_epsilon is None:
            if self.dp_clip is not None:
                raise _refuse("--dp-clip needs --dp-epsilon (the run's privacy budget at each site)")
            return self
        if not 0 < self.dp_epsilon <= MAX_DP_EPSILON:
            raise _refuse(f"--dp-epsilon must be above 0 and at most {MAX_DP_EPSILON:g}, not {self.dp_epsilon:g}")
        if self.dp_clip is not None and not 0 < self.dp_clip < math.inf:
            raise _refuse(f"--dp-clip must be a positive number, not {self.dp_clip:g}")
        return self

    def private_config(self) -> dict[str, Any]:
        """The run's differential-privacy settings as the sites read them from its config (empty without DP)."""
        if self.dp_epsilon is None:
            return {}
        return {
            "dp_epsilon": self.dp_epsilon,
            "dp_clip": 1.0 if self.dp_clip is None else self.dp_clip,
            "dp_rounds": self.rounds,
        }


MAX_THRESHOLD = 1_000_000


class QuerySpec(Body):
    """``POST /api/queries``: one statistic over the rows of a dataset that match a filter, at chosen sites.

    Whether the dataset exists, its columns and whether the sites are online is the coordinator's to
    say; what may leave is each site's."""

    dataset: Name
    kind: Annotated[QueryKind, Lax]
    columns: Annotated[list[Name], Field(max_length=MAX_COLUMNS)] = Field(default_factory=list)
    where: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    bins: int = 10
    range: tuple[float, float] | None = None
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=MAX_SITES)] | None = None
    threshold: int | None = None  # the project's own threshold: raises each site's, never lowers it
    text: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""  # as the researcher wrote it
    cohort: CohortName | None = None  # answer within this frozen cohort's rows (%flip_cohort)

    @field_validator("bins")
    @classmethod
    def _bins(cls, bins: int) -> int:
        if not 1 <= bins <= MAX_BINS:
            raise _refuse(f"--bins must be between 1 and {MAX_BINS}, not {bins}")
        return bins

    @field_validator("range")
    @classmethod
    def _range(cls, bounds: tuple[float, float] | None) -> tuple[float, float] | None:
        if bounds is not None and not bounds[0] < bounds[1]:
            raise _refuse(f"--range must be two numbers, the lower first, not {bounds[0]:g} {bounds[1]:g}")
        return bounds

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, threshold: int | None) -> int | None:
        if threshold is not None and not 1 <= threshold <= MAX_THRESHOLD:
            raise _refuse(f"--threshold must be a whole number from 1 to {MAX_THRESHOLD}, not {threshold}")
        return threshold

    @model_validator(mode="after")
    def _shape(self) -> QuerySpec:
        n, kind = len(self.columns), self.kind
        if kind in ELSEWHERE:
            raise _refuse(ELSEWHERE[kind])
        wrong = {
            QueryKind.COUNT: (n > 3, "count by takes at most three columns"),
            QueryKind.STATS: (n < 1, "stats needs at least one column"),
            QueryKind.HIST: (n != 1, "hist takes exactly one column"),
            QueryKind.CROSSTAB: (n != 2, "crosstab takes exactly two columns"),
            QueryKind.MISSING: (False, ""),
            QueryKind.COHORT: (n > 0, "a cohort takes no columns"),
            QueryKind.TOP: (n != 1 or self.columns[0] not in TOP_DOMAINS, f"top takes one of {', '.join(TOP_DOMAINS)}"),
            QueryKind.MOCK: (
                n > 0 or bool(self.where.strip()),
                "a mock is of the whole dataset: no columns, no filter",
            ),
        }[kind]
        if wrong[0]:
            raise _refuse(f"{wrong[1]}, not {' '.join(self.columns) if kind == QueryKind.TOP else n}")
        if len(set(self.columns)) != n:
            raise _refuse("a column is named twice")
        return self


class CohortSpec(Body):
    """``POST /api/cohorts``: freeze, at each site, the rows of a dataset that match a filter (or, for an OMOP
    database, an OHDSI Circe cohort definition: ``circe``, a JSON object each site renders to its own SQL), under a
    name."""

    name: CohortName
    dataset: Name
    where: Annotated[str, StringConstraints(max_length=MAX_QUERY_CHARS)] = ""
    sites: Annotated[list[SiteName], Field(min_length=1, max_length=MAX_SITES)] | None = None
    circe: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_definition(self) -> CohortSpec:
        if self.circe is not None:
            if self.where.strip():
                raise _refuse("a cohort is a filter or a Circe definition, not both")
            if len(json.dumps(self.circe)) > MAX_CIRCE_CHARS:
                raise _refuse(f"a Circe definition of at most {MAX_CIRCE_CHARS} characters, please")
        return self


class ReleaseSpec(Body):
    """``POST /api/airlock``: ask one site to release one item its rules hold back (``flip_core.airlock``): the
    traceback of a run's failed step there, its exact answer to a query, or the report of a run's final evaluation
    there (the cell's ``report()``). A person at the site decides."""

    site: SiteName
    item: Annotated[ItemKind, Lax]
    purpose: Annotated[str, StringConstraints(max_length=MAX_PURPOSE_CHARS)]
    run: Annotated[str, StringConstraints(max_length=NAME_CHARS)] = ""
    query: QuerySpec | None = None

    @model_validator(mode="after")
    def _shape(self) -> ReleaseSpec:
        if problem := purpose_problem(self.purpose):
            raise _refuse(f"the request's purpose: {problem}")
        if self.item != ItemKind.QUERY and (not self.run or self.query is not None):
            raise _refuse(f"a {self.item} is asked for by its run: give the run's id (and no query)")
        if self.item == ItemKind.QUERY:
            if self.query is None or self.run:
                raise _refuse("a query result is asked for by its query: give the query (and no run)")
            if self.query.kind in (QueryKind.COHORT, QueryKind.MOCK):
                raise _refuse(
                    f"a {self.query.kind} is not a result to release: ask for a count, stats, hist, crosstab or missing"
                )
        return self


# -- site agents ------------------------------------------------------------------------------------
class InclusionReport(Body):
    """An imaging dataset's cases: how many the manifest lists, how many are usable, how many were left out for
    each reason; counts under the site's threshold (and their complements) withheld (None)."""

    cases: Count | None = None
    included: Count | None = None
    excluded: Annotated[dict[Name, Count | None], Field(max_length=100)] = Field(default_factory=dict)
    patients: Count | None = None
    patients_with_several_cases: Count | None = None
    kinds: Annotated[dict[Name, Count | None], Field(max_length=20)] = Field(default_factory=dict)
    warnings: Count | None = None


class DatasetAnnouncement(Body):
    """A dataset as a site announces it: metadata only, counts under its threshold withheld (None)."""

    name: Name
    format: Annotated[str, StringConstraints(max_length=40)] = ""
    rows: Count | None = None
    train_rows: Count | None = None
    test_rows: Count | None = None
    columns: Annotated[list[Name], Field(max_length=10_000)] = Field(default_factory=list)
    dtypes: Annotated[list[Name], Field(max_length=10_000)] = Field(default_factory=list)
    fingerprint: Annotated[str, StringConstraints(max_length=100)] = ""
    inclusion: InclusionReport | None = None  # an imaging dataset's
    # the projects the site's policy admits to it; the hub shows the dataset to those alone (none: to nobody)
    projects: Annotated[list[Name], Field(max_length=1000)] = Field(default_factory=list)


class SiteInfo(Body):
    version: Annotated[str, StringConstraints(max_length=40)] = ""
    warm: bool = False  # a spare task process is loaded and waiting
    device: Annotated[str, StringConstraints(max_length=40)] = ""  # where its tasks run: "cpu", "cuda:0"
    packages: Annotated[dict[Name, Name], Field(max_length=100)] = Field(default_factory=dict)  # for run records
    environment: EnvironmentHash | None = None  # the site's installed package set, hashed
    datasets: Annotated[list[DatasetAnnouncement], Field(max_length=1000)] = Field(default_factory=list)


class SiteAnnouncement(Body):
    """``POST /site/announce``: a site agent says who it is, which node it is, what it holds."""

    site: SiteName
    node_id: NodeId | None = None
    info: SiteInfo = Field(default_factory=SiteInfo)
    state: Annotated[Presence, Lax] = Presence.ONLINE


# -- the ServerApp ----------------------------------------------------------------------------------
class Ring(Body):
    """``POST /internal/ring``: sites whose message is on the SuperLink again."""

    sites: Annotated[list[SiteName], Field(max_length=MAX_SITES)]


class QueryReplyBody(Body):
    """One site's reply to a query, as the query line hands it back (``flip_core.query.QueryReply``)."""

    site: SiteName
    status: Annotated[StepStatus, Lax]
    reason: Text = ""
    threshold: Count = 0
    table: Annotated[dict[Name, Any], Field(max_length=100)] = Field(default_factory=dict)
    version: Annotated[str, StringConstraints(max_length=40)] = ""
    seconds: Annotated[float, Field(ge=0)] = 0.0


QueryReplies = Annotated[list[QueryReplyBody], Field(max_length=MAX_SITES)]


class StepTraffic(Body):
    """The payloads one site received (the model) and sent (its update or answer) in one step of a run."""

    round: Count
    phase: Annotated[Phase, Lax]
    received_bytes: Count
    sent_bytes: Count


class RunEvent(Body):
    type: Literal["run"]
    status: Annotated[RunStatus, Lax]
    reason: Text = ""
    sites: Annotated[list[SiteName], Field(max_length=MAX_SITES)] | None = None
    model_sha256: Sha256 | None = None
    site_info: Annotated[dict[SiteName, dict[Name, str | int | float | None]], Field(max_length=MAX_SITES)] | None = (
        None
    )
    failed_sites: Annotated[dict[SiteName, Text], Field(max_length=MAX_SITES)] | None = None
    traffic: (
        Annotated[dict[SiteName, Annotated[list[StepTraffic], Field(max_length=100_000)]], Field(max_length=MAX_SITES)]
        | None
    ) = None  # every step's bytes per site, kept in the run record
    aggregation_ordered: bool | None = None  # every round's updates summed in the sites' order (bit-repeatable)


class SiteEvent(Body):
    type: Literal["site"]
    site: SiteName
    status: Annotated[SiteState, Lax]
    round: Count
    detail: Text = ""
    samples: Count | None = None
    seconds: Annotated[float, Field(ge=0)] | None = None
    received_bytes: Count | None = None  # the step's payload the site received this round (the model)
    sent_bytes: Count | None = None  # the reply's payload the site sent back
    device: Annotated[str, StringConstraints(max_length=40)] | None = None  # where the step ran
    gpu_peak_bytes: Count | None = None  # on a GPU: peak memory torch allocated in the step
    gpu_seconds: Annotated[float, Field(ge=0)] | None = None  # on a GPU: the step's wall seconds, queue drained


class MetricsEvent(Body):
    type: Literal["metrics"]
    round: Count
    site: Annotated[str, AfterValidator(lambda s: s if s == "global" else _site_name(s))]
    phase: Annotated[MetricPhase, Lax]
    metrics: Annotated[dict[Name, float], Field(max_length=1000)]
    samples: Count | None = None


class RoundEvent(Body):
    type: Literal["round"]
    round: Count
    sites: Count
    seconds: Annotated[float, Field(ge=0)]


Event = Annotated[RunEvent | SiteEvent | MetricsEvent | RoundEvent, Field(discriminator="type")]
Events = Annotated[list[Event], Field(max_length=MAX_EVENTS)]


__all__ = [
    "MAX_JSON_BYTES",
    "PROJECT_HEADER",
    "MAX_THRESHOLD",
    "SITE_NAME",
    "Body",
    "CohortSpec",
    "DatasetAnnouncement",
    "Event",
    "Events",
    "MetricNames",
    "MetricsEvent",
    "Ring",
    "RoundEvent",
    "RunEvent",
    "SiteAnnouncement",
    "SiteEvent",
    "QueryReplies",
    "QueryReplyBody",
    "QuerySpec",
    "ReleaseSpec",
    "SiteInfo",
    "NotebookInfo",
    "TaskSpec",
    "parse",
    "sentence",
]
