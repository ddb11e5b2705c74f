"""The site admin's policy: parsed once from ``site.toml``, then pure decisions over tasks.

Default deny. A task runs at this site only if its project is approved here, its researcher
and dataset are allowed for that project, its kind is allowed, it meets the project's
differential-privacy demands and budget, and its code (by hash of the normalised source) is
approved or the project auto-approves for development. Nothing here reads files, talks to
the network or looks at data: the agent gathers the facts, this module decides.

``site.toml`` (beside ``[site]`` and ``[datasets.*]``, which ``site_agent.data.catalog`` owns)::

    [policy]
    disclosure_threshold = 10        # the least any project may use
    count_noise = 2                  # every released count moves by at most this (cell-key perturbation; 0: exact)
    cohort_limit_rows = 100000       # a cohort larger than this is refused (default: no limit)
    # what every run's task process is held to here (site_agent.tasks.service, site_agent.sandbox):
    result_limit_mb = 64             # a step's result (default: none set, the step's own size plus 1 MiB)
    log_limit_mb = 8                 # a step's output kept in the site's log (then cut, with a note)
    log_limit_lines = 100000
    scratch_limit_mb = 1024          # the run's scratch folder (a tmpfs of this size, in memory)
    file_limit_mb = 512              # any one file the task process writes (RLIMIT_FSIZE)
    runs_limit = 8                   # runs with a task process here at once (a run past it is refused)

    [projects.heart]
    approved = true
    researchers = ["alice", "bob"]   # or ["*"]: anyone the hub lets into the project
    datasets = ["heart-disease"]     # or ["*"]: any dataset registered here
    tasks = ["train", "query"]        # "query": federated statistics (%flip_query), no code runs
    query_columns = ["*"]            # the columns a query of this project may name or filter on
    metrics = ["loss", "accuracy"]   # the metric names that may leave (default ["*"]: any the task declared)
    auto_approve = false             # true: code runs without an admin's approval (development)
    disclosure_threshold = 10
    count_noise = 2                  # at least the site's
    dp_required = false
    max_epsilon = 8.0                # privacy budget of this project at this site (all its runs together)
    query_epsilon = 0.5              # if set: each query is answered under DP and spends this of the budget
    dp_delta = 1e-5                  # the delta at which this site accounts epsilon
    time_limit_seconds = 3600        # per step
    memory_limit_mb = 4096
    model_alone = false              # true: a model fitted on this site's rows alone may leave (%flip_model)
    model_parameter_fraction = 0.2   # a model's parameters at most this fraction of its complete rows here
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from flip_core.airlock import ItemKind
from flip_core.errors import ConfigError

DEFAULT_THRESHOLD = 10
DEFAULT_COUNT_NOISE = 2  # the most a released count moves (site_agent.queries.perturbation)
MAX_COUNT_NOISE = 50
TASK_KINDS = ("train", "query")
DEFAULT_TASKS = ("train",)
ANY = "*"

ALLOW, PENDING, REFUSE = "allow", "pending", "refuse"


class PolicyError(ConfigError):
    """``site.toml``'s policy cannot be read; the message says where and why."""


@dataclass(frozen=True)
class ProjectPolicy:
    name: str
    approved: bool = False
    researchers: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    tasks: tuple[str, ...] = DEFAULT_TASKS
    query_columns: tuple[str, ...] = (ANY,)
    metrics: tuple[str, ...] = (ANY,)
    auto_approve: bool = False
    disclosure_threshold: int = DEFAULT_THRESHOLD
    count_noise: int = DEFAULT_COUNT_NOISE
    dp_required: bool = False
    max_epsilon: float | None = None
    query_epsilon: float | None = None  # queries answered under differential privacy, each spending this
    dp_delta: float = 1e-5
    time_limit_seconds: float = 3600.0
    memory_limit_mb: int = 4096
    airlock_refuses: tuple[str, ...] = ()  # kinds of airlock item this site refuses the project outright
    model_alone: bool = False  # a model fitted on this site's rows alone may leave (site_agent.queries.models)
    model_parameter_fraction: float = 0.2  # a model's parameters at most this fraction of its complete rows here

    def allows(self, names: tuple[str, ...], name: str) -> bool:
        return ANY in names or name in names


@dataclass(frozen=True)
class TaskLimits:
    """What this site holds every run's task process to, whatever the project (``[policy]``): the bytes of a step's
    result (None: the step's own size plus room, ``site_agent.tasks.messages.result_cap``), the output of a step
    kept in the site's log, the run's scratch folder and any one file it writes, and how many runs hold a task
    process here at once (a run past it is refused at its first step here). Processes and threads per run:
    ``FLIP_TASK_NPROC`` (``site_agent.sandbox``); time and memory: per project."""

    result_limit_mb: float | None = None
    log_limit_mb: float = 8.0
    log_limit_lines: int = 100_000
    scratch_limit_mb: int = 1024
    file_limit_mb: int = 512
    runs_limit: int = 8  # runs with a task process here at once (each may use its project's memory)


LIMIT_KEYS = tuple(TaskLimits.__dataclass_fields__)


@dataclass(frozen=True)
class SitePolicy:
    site: str
    projects: dict[str, ProjectPolicy] = field(default_factory=dict)
    disclosure_threshold: int = DEFAULT_THRESHOLD
    limits: TaskLimits = field(default_factory=TaskLimits)
    count_noise: int = DEFAULT_COUNT_NOISE
    airlock_refuses: tuple[str, ...] = ()  # kinds of airlock item (flip_core.airlock.ItemKind) refused outright
    cohort_limit_rows: int | None = None  # the most rows a cohort may freeze here (None: no limit)

    def project(self, name: str) -> ProjectPolicy | None:
        return self.projects.get(name)

    def metrics(self, project: str) -> tuple[str, ...]:
        """The metric names ``project`` may send from this site (``("*",)``: any its task declared before it ran)."""
        found = self.projects.get(project)
        return found.metrics if found else ()

    def threshold(self, project: str) -> int:
        """The disclosure threshold for ``project`` (the site's, for a project it does not know)."""
        found = self.projects.get(project)
        return max(self.disclosure_threshold, found.disclosure_threshold if found else 0)

    def noise(self, project: str) -> int:
        """The most a count released to ``project`` moves from the truth (the site's, for a project it does not
        know): the same rows always move by the same amount (``site_agent.queries.perturbation``)."""
        found = self.projects.get(project)
        return max(self.count_noise, found.count_noise if found else 0)

    def refuses_release(self, project: str, item: str) -> str:
        """Why this site refuses every airlock request for an item of kind ``item`` from ``project`` ("" if not)."""
        found = self.projects.get(project)
        if item in self.airlock_refuses or (found is not None and item in found.airlock_refuses):
            return (
                f"{self.site}'s policy refuses every request for a {item} outright; no one at the site will review it"
            )
        return ""

    def admitted(self, dataset: str) -> tuple[str, ...]:
        """The approved projects that may use ``dataset`` here (what the site announces of it: only they see it)."""
        return tuple(sorted(p.name for p in self.projects.values() if p.approved and p.allows(p.datasets, dataset)))


@dataclass(frozen=True)
class TaskFacts:
    """What a task says about itself (carried with every step) and what the site knows of it."""

    project: str
    researcher: str
    dataset: str
    source_hash: str
    kind: str = "train"
    dp_epsilon: float | None = None


@dataclass(frozen=True)
class Budget:
    """A project's epsilon at this site: spent so far, and after the task's releases (the accountant's figures)."""

    spent: float = 0.0
    after: float = 0.0


@dataclass(frozen=True)
class Approval:
    """The admin's word on one (project, code hash): "approved", "rejected" or "" (none yet)."""

    state: str = ""
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    verdict: str  # ALLOW, PENDING or REFUSE
    reason: str = ""

    @property
    def allowed(self) -> bool:
        return self.verdict == ALLOW


_PROJECT_KEYS = {f for f in ProjectPolicy.__dataclass_fields__ if f != "name"}


def _names(where: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PolicyError(f'{where} must be a list of names, e.g. ["alice"] or ["*"]')
    return tuple(value)


def _number(where: str, value: Any, *, integer: bool = False, least: float = 0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise PolicyError(f"{where} must be {'a whole number' if integer else 'a number'}")
    if not math.isfinite(value) or value < least:
        raise PolicyError(f"{where} must be at least {least:g}")
    return value


def _flag(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(f"{where} must be true or false")
    return value


def _fraction(project: str, value: Any) -> float:
    """A model's parameters as a fraction of a site's rows: above 0, at most 0.5 (default 0.2, DataSHIELD's)."""
    where = f"{project} model_parameter_fraction"
    number = 0.2 if value is None else _number(where, value)
    if not 0 < number <= 0.5:
        raise PolicyError(f"{where} must be above 0 and at most 0.5 (default 0.2)")
    return number


def _delta(where: str, value: Any) -> float:
    number = _number(where, value)
    if not 0 < number < 1:
        raise PolicyError(f"{where} must be between 0 and 1 (e.g. 1e-5)")
    return number


def parse_policy(site: str, raw: dict[str, Any]) -> SitePolicy:
    """The policy in a parsed ``site.toml``; a site without one refuses every task."""
    section = raw.get("policy", {})
    if not isinstance(section, dict):
        raise PolicyError("[policy] must be a table")
    unknown = set(section) - {
        "disclosure_threshold",
        "count_noise",
        "airlock_refuses",
        "cohort_limit_rows",
        *LIMIT_KEYS,
    }
    if unknown:
        raise PolicyError(f"[policy] has unknown setting(s): {', '.join(sorted(unknown))}")
    given = section.get("disclosure_threshold", DEFAULT_THRESHOLD)
    floor = int(_number("[policy] disclosure_threshold", given, integer=True, least=1))
    noise = _count_noise("[policy] count_noise", section.get("count_noise", DEFAULT_COUNT_NOISE))
    projects: dict[str, ProjectPolicy] = {}
    for name, body in (raw.get("projects") or {}).items():
        where = f"[projects.{name}]"
        if not isinstance(body, dict):
            raise PolicyError(f"{where} must be a table")
        unknown = set(body) - _PROJECT_KEYS
        if unknown:
            raise PolicyError(f"{where} has unknown setting(s): {', '.join(sorted(unknown))}")
        tasks = _names(f"{where} tasks", body.get("tasks", list(DEFAULT_TASKS)))
        if bad := sorted(set(tasks) - set(TASK_KINDS)):
            raise PolicyError(f"{where} tasks: unknown kind(s) {', '.join(bad)} (known: {', '.join(TASK_KINDS)})")
        threshold = int(
            _number(f"{where} disclosure_threshold", body.get("disclosure_threshold", floor), integer=True, least=1)
        )
        if threshold < floor:
            raise PolicyError(f"{where} disclosure_threshold {threshold} is below the site's {floor}")
        own_noise = _count_noise(f"{where} count_noise", body.get("count_noise", noise))
        if own_noise < noise:
            raise PolicyError(f"{where} count_noise {own_noise} is below the site's {noise}")
        epsilon = body.get("max_epsilon")
        per_query = body.get("query_epsilon")
        if per_query is not None:
            per_query = _number(f"{where} query_epsilon", per_query)
            if per_query <= 0 or epsilon is None or per_query > epsilon:
                raise PolicyError(
                    f"{where} query_epsilon must be above 0 and at most the project's max_epsilon (its budget here, "
                    "which the queries spend)"
                )
        projects[name] = ProjectPolicy(
            name=name,
            approved=_flag(f"{where} approved", body.get("approved", False)),
            researchers=_names(f"{where} researchers", body.get("researchers", [])),
            datasets=_names(f"{where} datasets", body.get("datasets", [])),
            tasks=tasks,
            metrics=_names(f"{where} metrics", body.get("metrics", [ANY])),
            query_columns=_names(f"{where} query_columns", body.get("query_columns", [ANY])),
            auto_approve=_flag(f"{where} auto_approve", body.get("auto_approve", False)),
            disclosure_threshold=threshold,
            count_noise=own_noise,
            dp_required=_flag(f"{where} dp_required", body.get("dp_required", False)),
            max_epsilon=None if epsilon is None else _number(f"{where} max_epsilon", epsilon),
            query_epsilon=per_query,
            dp_delta=_delta(f"{where} dp_delta", body.get("dp_delta", 1e-5)),
            time_limit_seconds=_number(f"{where} time_limit_seconds", body.get("time_limit_seconds", 3600.0), least=1),
            memory_limit_mb=int(
                _number(f"{where} memory_limit_mb", body.get("memory_limit_mb", 4096), integer=True, least=64)
            ),
            airlock_refuses=_items(f"{where} airlock_refuses", body.get("airlock_refuses", [])),
            model_alone=_flag(f"{where} model_alone", body.get("model_alone", False)),
            model_parameter_fraction=_fraction(where, body.get("model_parameter_fraction")),
        )
    return SitePolicy(
        site=site,
        projects=projects,
        disclosure_threshold=floor,
        limits=_limits(section),
        count_noise=noise,
        airlock_refuses=_items("[policy] airlock_refuses", section.get("airlock_refuses", [])),
        cohort_limit_rows=_rows_limit("[policy] cohort_limit_rows", section.get("cohort_limit_rows")),
    )


def _rows_limit(where: str, value: Any) -> int | None:
    """A limit on rows: a whole number of at least one, or none."""
    return None if value is None else int(_number(where, value, integer=True, least=1))


def _items(where: str, value: Any) -> tuple[str, ...]:
    """Kinds of airlock item, each one ``flip_core.airlock.ItemKind`` knows."""
    names = _names(where, value) if value != [] else ()
    known = [str(k) for k in ItemKind]
    if bad := sorted(set(names) - set(known)):
        raise PolicyError(f"{where}: unknown kind(s) {', '.join(bad)} (known: {', '.join(known)})")
    return names


def _count_noise(where: str, value: Any) -> int:
    number = int(_number(where, value, integer=True))
    if number > MAX_COUNT_NOISE:
        raise PolicyError(f"{where} must be at most {MAX_COUNT_NOISE}")
    return number


def _limits(section: dict[str, Any]) -> TaskLimits:
    """``[policy]``'s limits on every task process (:class:`TaskLimits`), each checked."""
    default = TaskLimits()
    result = section.get("result_limit_mb")
    return TaskLimits(
        result_limit_mb=None if result is None else _number("[policy] result_limit_mb", result, least=1),
        log_limit_mb=_number("[policy] log_limit_mb", section.get("log_limit_mb", default.log_limit_mb), least=0.01),
        log_limit_lines=int(
            _number("[policy] log_limit_lines", section.get("log_limit_lines", default.log_limit_lines), integer=True)
        ),
        scratch_limit_mb=int(
            _number(
                "[policy] scratch_limit_mb",
                section.get("scratch_limit_mb", default.scratch_limit_mb),
                integer=True,
                least=1,
            )
        ),
        file_limit_mb=int(
            _number(
                "[policy] file_limit_mb", section.get("file_limit_mb", default.file_limit_mb), integer=True, least=1
            )
        ),
        runs_limit=int(
            _number("[policy] runs_limit", section.get("runs_limit", default.runs_limit), integer=True, least=1)
        ),
    )


def query_columns_refused(policy: SitePolicy, project: str, names: tuple[str, ...]) -> str:
    """The sentence refusing a query that names columns ``project`` may not query here ("" when it may)."""
    found = policy.project(project)
    allowed = found.query_columns if found else ()
    if ANY in allowed or not (barred := sorted(set(names) - set(allowed))):
        return ""
    return (
        f"project {project!r} may not query column(s) {', '.join(barred)} at {policy.site} "
        f"(it may query: {', '.join(allowed) or 'none'})"
    )


def decide(policy: SitePolicy, task: TaskFacts, approval: Approval = Approval(), budget: Budget = Budget()) -> Decision:
    """May ``task`` run here now? Refusals say why in a sentence the researcher may read."""
    site = policy.site
    project = policy.project(task.project)
    if project is None or not project.approved:
        return Decision(REFUSE, f"project {task.project!r} is not approved at {site}")
    if not project.allows(project.researchers, task.researcher):
        return Decision(
            REFUSE, f"researcher {task.researcher!r} may not run tasks of project {task.project!r} at {site}"
        )
    if not project.allows(project.datasets, task.dataset):
        return Decision(REFUSE, f"project {task.project!r} may not use dataset {task.dataset!r} at {site}")
    if task.kind not in project.tasks:
        return Decision(REFUSE, f"{task.kind} tasks are not allowed for project {task.project!r} at {site}")
    if project.dp_required and task.dp_epsilon is None:
        return Decision(
            REFUSE,
            f"{site} requires differential privacy for project {task.project!r} "
            f"(set --dp-epsilon, at most {project.max_epsilon:g})"
            if project.max_epsilon is not None
            else f"{site} requires differential privacy for project {task.project!r} (set --dp-epsilon)",
        )
    if (
        task.dp_epsilon is not None
        and project.max_epsilon is not None
        and budget.after > project.max_epsilon * (1 + 1e-9)
    ):
        this = "this query" if task.kind == "query" else f"this task (--dp-epsilon {task.dp_epsilon:g})"
        return Decision(
            REFUSE,
            f"the privacy budget of project {task.project!r} at {site} is exhausted: "
            f"epsilon {budget.spent:.3g} of {project.max_epsilon:g} spent; {this} would bring it to "
            f"{budget.after:.3g}",
        )
    if task.kind == "query":  # no code of the researcher's runs: no approval to wait for
        return Decision(ALLOW)
    if approval.state == "rejected":
        why = f": {approval.reason}" if approval.reason else ""
        return Decision(REFUSE, f"{site} rejected this code ({task.source_hash[:19]}){why}")
    if approval.state == "approved" or project.auto_approve:
        return Decision(ALLOW)
    return Decision(PENDING, f"waiting for approval at {site}")
