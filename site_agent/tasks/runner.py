"""Run one task step of a researcher's cell against this site's data.

The cell source defines ``build_model()``, ``train(model, data, config) -> dict`` and
``evaluate(model, data, config) -> dict``. This module executes it on the site's own split,
loads the global parameters, runs evaluate and/or train, and returns parameters and scalar
metrics, and a failure in the words of ``flip_core.vocabulary`` (a phase, a standard exception type, a line).

It runs in the task process, beside the researcher's code, which can rewrite any of it: what it returns is a claim.
The site agent builds what leaves from it field by field (``site_agent.disclosure.guard``), from the vocabulary and
from what the agent knows itself (the device, the dataset's fingerprint, the rows, the time).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from flip_core.airlock import REPORT_FUNCTION, cut_text
from flip_core.cell import (
    CELL_FILENAME,
    cell_line,
    failed_step,
    missing_functions,
    proximal_term,
    seed_everything,
    step_seed,
)
from flip_core.errors import FlipError
from flip_core.protocol import StepRequest, StepResult
from flip_core.status import Phase, StepStatus
from flip_core.vocabulary import CELL_FAILURES, MEMORY_LIMIT, exception_name
from site_agent.data.catalog import CatalogError, ImagesChanged, Part, SiteConfig
from site_agent.data.formats import load_split, task_data
from site_agent.tasks.reports import encode_report, failed_report

log = logging.getLogger(__name__)


class TaskData:
    """What the cell's functions receive as ``data``: this site's split, never more.

    ``train`` and ``test`` are tables (``pandas.DataFrame``) for a table, and lists of dictionaries for an
    imaging dataset (``{"image": path, "label": ..., "patient_id": ..., clinical columns...}``, what MONAI's
    dictionary transforms take). ``device`` is the site's choice (``flip-site start --device``), also in
    ``config["device"]``."""

    def __init__(
        self,
        train: Part,
        test: Part,
        *,
        site: str,
        dataset: str,
        round_: int,
        global_params: dict[str, np.ndarray],
        proximal_mu: float,
        device: str = "cpu",
        cache: Callable[[str, Any], Any] | None = None,
    ) -> None:
        self.train = train
        self.test = test
        self.site = site
        self.dataset = dataset
        self.round = round_
        self.device = device
        self._global = global_params
        self._cache = cache
        self.proximal_mu = proximal_mu

    def cached(self, part: str, transform: Any = None) -> Any:
        """The MONAI dataset of this site's ``"train"`` or ``"test"`` cases under ``transform``, decoded once per
        run: a ``monai.data.CacheDataset`` that the warm task process keeps across the run's rounds, so later
        rounds read no file (the transforms up to the first random one are cached; random ones run at each use).
        Define ``transform`` once, at the cell's top level: a new transform object makes a new cache."""
        if part not in ("train", "test"):
            raise ValueError(f"part must be 'train' or 'test', not {part!r}")
        if self._cache is None:
            raise RuntimeError("this data has no cache (a table's rows need none)")
        return self._cache(part, transform)

    def proximal_term(self, model: Any) -> Any:
        """FedProx's ``mu/2 * ||w - w_global||^2`` for ``model`` (0 unless the run uses fedprox)."""
        return proximal_term(model, self._global, self.proximal_mu)


class StepFailed(FlipError):
    """The cell failed at this site; carries what may be told to the researcher."""

    def __init__(self, error_type: str, line: int, where: str) -> None:
        super().__init__(failed_step(error_type, line, where))
        self.error_type = error_type
        self.line = line
        self.where = where
        self.detail = ""  # the traceback of the researcher's code that failed, when there is one

    def _args(self) -> tuple[Any, ...]:
        return (self.error_type, self.line, self.where)


# the site's limits as a task process meets them (the agent tells each in its own sentence naming the site and the
# limit: site_agent.tasks.service.TaskService.failures): its scratch full, a file past RLIMIT_FSIZE
LIMIT_ERRNOS = {errno.ENOSPC: "ScratchLimit", errno.EDQUOT: "ScratchLimit", errno.EFBIG: "FileSizeLimit"}


def _error_type(exc: BaseException) -> str:
    """The exception's type in the vocabulary (a standard name, ``flip_core.vocabulary.exception_name``); running out
    of one of the site's limits (memory, scratch, file size, threads) says so."""
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        return MEMORY_LIMIT
    if isinstance(exc, OSError) and exc.errno in LIMIT_ERRNOS:
        return LIMIT_ERRNOS[exc.errno]
    if isinstance(exc, RuntimeError) and "can't start new thread" in str(exc):  # RLIMIT_NPROC, in its namespace
        return "ProcessLimit"
    return exception_name(exc)


@contextlib.contextmanager
def _guarded(where: str):  # type: ignore[no-untyped-def]
    try:
        yield
    except StepFailed:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure of researcher code is reported
        if isinstance(exc, KeyboardInterrupt):
            raise
        text = "".join(traceback.format_exception(exc))
        log.warning("task failed in %s:\n%s", where, text)
        failed = StepFailed(_error_type(exc), cell_line(exc), where)
        failed.detail = text  # for the site's airlock (never in what the site sends: the guard rebuilds that)
        raise failed from None


def load_cell(source: str) -> dict[str, Any]:
    """Execute the cell source in a fresh namespace and check its three functions."""
    namespace: dict[str, Any] = {"__name__": "__flip_task__"}
    with _guarded("the cell"):
        code = compile(source, CELL_FILENAME, "exec")
        exec(code, namespace)  # noqa: S102 - the researcher's cell, run only at its site
    if missing := missing_functions(namespace):
        raise StepFailed("MissingFunction", 0, ", ".join(missing))
    return namespace


def _report(report: Any, model: Any, data: Any, config: dict[str, Any]) -> str:
    """The cell's report of its final evaluation, for the site's airlock only; never a reason for the step to fail."""
    try:
        return encode_report(report(model, data, config))
    except Exception:  # noqa: BLE001 - the researcher's code: its failure is part of the report
        return failed_report()


def _scalar_metrics(value: Any, where: str) -> dict[str, float]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StepFailed("BadReturn", 0, CELL_FAILURES["BadReturn"][where == "evaluate()"])
    out: dict[str, float] = {}
    for key, raw in value.items():
        try:
            number = float(raw.item() if hasattr(raw, "item") else raw)
        except (TypeError, ValueError):
            raise StepFailed("BadMetric", 0, CELL_FAILURES["BadMetric"][where == "evaluate()"]) from None  # name stays
        if math.isfinite(number):
            out[str(key)] = number
    return out


def _state_arrays(model: Any) -> dict[str, np.ndarray]:
    # views of the model's tensors, not copies: the model is not used again after its step
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _load_params(model: Any, params: dict[str, np.ndarray]) -> None:
    import torch

    own = model.state_dict()
    if set(own) != set(params):
        raise StepFailed("ModelMismatch", 0, CELL_FAILURES["ModelMismatch"][0])
    for name, array in params.items():
        if tuple(own[name].shape) != tuple(array.shape):
            raise StepFailed("ModelMismatch", 0, CELL_FAILURES["ModelMismatch"][1])
    # the step's arrays are writable views of the buffer it came in (site_agent.tasks.messages.STEP): no copy
    # before load_state_dict's own; a read-only array (a step decoded from bytes) is copied first
    model.load_state_dict({k: torch.from_numpy(v if v.flags.writeable else np.array(v)) for k, v in params.items()})


@dataclass
class HandedRun:
    """What the agent handed a task process when its run adopted it: the run's dataset, its cohort ("": none), and
    the payload of the run's rows only (``site_agent.data.formats.handed``)."""

    dataset: str
    cohort: str
    payload: bytes


class TaskSession:
    """One run's task at this site, kept warm between steps: cell, data and torch loaded once."""

    def __init__(
        self,
        site: SiteConfig,
        log_dir: Path | None = None,
        *,
        sink: TextIO | None = None,
        handed: HandedRun | None = None,
        device: str = "cpu",
        unusable: str = "",
    ) -> None:
        """``sink``: where the task's output goes (the task process's stdout, a pipe to the site agent,
        which keeps the run's log); without one, each run's log is a file in ``log_dir``. ``handed``: what the
        agent handed this task process for its run, the only data it reads; without it (a session in the agent's
        own process: tests, :func:`run_step`) the session reads a whole dataset itself, as the agent would hand it."""
        self.site = site
        self.handed = handed
        self.log_dir = log_dir or site.root / "logs"
        self.sink = sink
        self._namespaces: dict[str, dict[str, Any]] = {}
        self._splits: dict[str, tuple[Part, Part]] = {}
        self._datasets: dict[str, tuple[Any, Any]] = {}  # (transform, CacheDataset) per dataset, cohort and part
        self.device = device
        self.unusable = unusable  # why this process cannot use the site's device (every step fails saying so)

    @contextlib.contextmanager
    def _output(self, run_id: str) -> Iterator[TextIO]:
        if self.sink is not None:
            yield self.sink
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"run-{run_id}.log", "a") as sink:
            yield sink

    def step(self, request: StepRequest) -> StepResult:
        """Run one step; any failure of the cell comes back as a result with status "error"."""
        started = time.monotonic()
        if request.dataset not in self.site.datasets:
            return StepResult(site=self.site.name, status=StepStatus.NO_DATASET)
        entry = self.site.datasets[request.dataset]
        if self.unusable:  # why is in the site's log; the agent tells it in its own sentence
            return StepResult(site=self.site.name, status=StepStatus.ERROR, error_type="DeviceUnavailable")
        result = StepResult(site=self.site.name, status=StepStatus.OK, fingerprint=entry.fingerprint)
        with self._output(request.run_id) as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            print(f"--- round {request.round} phase {request.phase} ---", flush=True)
            try:
                self._run(request, result)
            except StepFailed as failed:
                traceback.print_exc(file=sink)
                result.status = StepStatus.ERROR
                result.error_type, result.error_line, result.error_where = failed.error_type, failed.line, failed.where
                result.detail = cut_text(failed.detail)
                result.params = {}
            except CatalogError as exc:
                print(f"catalog error: {exc}", file=sink)
                result.status = StepStatus.ERROR
                result.error_type = "DatasetChanged" if isinstance(exc, ImagesChanged) else "DatasetUnavailable"
                result.error_where = exc.public  # fixed text, or none: the agent's sentence
            sink.flush()
        result.seconds = time.monotonic() - started
        return result

    def _split(self, dataset: str, cohort: str) -> tuple[Part, Part]:
        key = f"{dataset}\0{cohort}"
        if key not in self._splits:
            self._splits[key] = self._read(dataset, cohort)
        return self._splits[key]

    def _read(self, dataset: str, cohort: str) -> tuple[Part, Part]:
        """The run's parts, from what the agent handed this process (its dataset and cohort, nothing else), read
        once: its bytes are dropped after."""
        handed = self.handed
        if handed is None:
            if cohort:
                raise CatalogError(f"the rows of cohort {cohort!r} did not reach this task process")
            return load_split(self.site, dataset)
        if (dataset, cohort) != (handed.dataset, handed.cohort):
            asked = f"{dataset!r}" + (f" in cohort {cohort!r}" if cohort else "")
            raise CatalogError(f"this task process was handed its own run's rows only, not those of {asked}")
        parts = task_data(self.site, dataset, handed.payload)  # as the dataset's format says
        handed.payload = b""
        return parts

    def _cached(self, dataset: str, cohort: str) -> Callable[[str, Any], Any]:
        """``TaskData.cached`` for this dataset and cohort: one CacheDataset per part, kept while the
        transform it was made with is the one asked for."""

        def cached(part: str, transform: Any) -> Any:
            key = f"{dataset}\0{cohort}\0{part}"
            held = self._datasets.get(key)
            if held is None or held[0] is not transform:
                from monai.data.dataset import CacheDataset

                train, test = self._split(dataset, cohort)
                chosen = train if part == "train" else test
                cases = [dict(c) for c in chosen if isinstance(c, dict)]
                held = self._datasets[key] = (
                    transform,
                    CacheDataset(data=cases, transform=transform, cache_rate=1.0, num_workers=0, progress=False),
                )
            return held[1]

        return cached

    def _namespace(self, request: StepRequest) -> dict[str, Any]:
        if request.source_hash not in self._namespaces:
            self._namespaces[request.source_hash] = load_cell(request.source)
        return self._namespaces[request.source_hash]

    def _run(self, request: StepRequest, result: StepResult) -> None:
        train_df, test_df = self._split(request.dataset, request.cohort)
        result.num_train, result.num_test = len(train_df), len(test_df)
        namespace = self._namespace(request)
        seed_everything(step_seed(request.seed, request.round, self.site.name))
        data = TaskData(
            _copy(train_df),
            _copy(test_df),
            site=self.site.name,
            dataset=request.dataset,
            round_=request.round,
            global_params=request.params,
            proximal_mu=float(request.config.get("proximal_mu", 0.0)),
            device=self.device,
            cache=self._cached(request.dataset, request.cohort) if isinstance(train_df, list) else None,
        )
        config = {**request.config, "device": self.device}  # the site's choice, over the researcher's
        result.device = self.device
        with gpu_use(self.device) as gpu:
            self._cell_calls(request, result, namespace, data, config, len(train_df))
        result.gpu_peak_bytes, result.gpu_seconds = gpu.peak_bytes, gpu.seconds

    def _cell_calls(
        self,
        request: StepRequest,
        result: StepResult,
        namespace: dict[str, Any],
        data: TaskData,
        config: dict[str, Any],
        train_rows: int,
    ) -> None:
        with _guarded("build_model()"):
            model = namespace["build_model"]()
        _load_params(model, request.params)
        if not (request.phase == Phase.FIT and request.round == 1):  # the prepare step evaluated that model
            with _guarded("evaluate()"):
                evaluated = namespace["evaluate"](model, data, config)
            result.eval_metrics = _scalar_metrics(evaluated, "evaluate()")
        if request.phase == Phase.EVALUATE and callable(namespace.get(REPORT_FUNCTION)):
            result.report = _report(namespace[REPORT_FUNCTION], model, data, config)
        if request.phase != Phase.FIT:
            return
        with _guarded("train()"):
            trained = namespace["train"](model, data, config)
        metrics = _scalar_metrics(trained, "train()")
        # the cell may weight its update by fewer examples than its split holds, never by more or by none
        reported = int(metrics.pop("num_examples", result.num_train))
        result.num_train = reported if 1 <= reported <= train_rows else train_rows
        result.train_metrics = metrics
        result.params = _state_arrays(model)


def _copy(part: Part) -> Part:
    """The cell's own copy of its rows or cases (what it changes is gone at the next step)."""
    return [dict(case) for case in part] if isinstance(part, list) else part.copy()


class GpuUse:
    """A step's use of the site's GPU: peak memory allocated by torch, and wall seconds with the GPU's queue
    drained at the end (zero on a CPU)."""

    peak_bytes: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def gpu_use(device: str) -> Iterator[GpuUse]:
    use = GpuUse()
    if not device.startswith("cuda"):
        yield use
        return
    import torch

    torch.cuda.reset_peak_memory_stats(device)
    started = time.monotonic()
    try:
        yield use
    finally:
        torch.cuda.synchronize(device)
        use.seconds = time.monotonic() - started
        use.peak_bytes = int(torch.cuda.max_memory_allocated(device))


def run_step(site: SiteConfig, request: StepRequest) -> StepResult:
    """One step in a fresh session (nothing kept)."""
    return TaskSession(site).step(request)
