"""IPython magics: each parses its arguments and delegates to :mod:`flip_magics.client`."""

from __future__ import annotations

import functools
import html
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from IPython.display import Image, display

from flip_core.errors import FlipError, NotConnected
from flip_core.records import compare
from flip_core.runs import record_of
from flip_core.status import RunStatus
from flip_magics.client import FlipClient, RunHandle
from flip_magics.compare_view import comparison_figure, comparison_frame
from flip_magics.explain import Explanation
from flip_magics.figures import png
from flip_magics.queries import STATISTIC_HELP, QueryResult, parse_statistic
from flip_magics.widgets import RunWidget

DEFAULT_OUT = "flip_run"


def _friendly(method: Any) -> Any:
    """Turn FLIP's errors into a one-sentence UsageError (no traceback in the notebook)."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except FlipError as exc:
            raise UsageError(str(exc)) from None

    return wrapper


def read_text(path: str, what: str) -> str:
    """A file an option names (a JSON definition), or a UsageError that says which and why."""
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the {what} {path}: {getattr(exc, 'strerror', None) or exc}") from None


def parse_config(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; values read as JSON where they parse (numbers, true/false), else text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--config takes key=value pairs, not {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        if not isinstance(value, (str, int, float, bool)):
            value = raw
        out[key] = value
    return out


def unquoted(text: str) -> str:
    """An option's value as meant: IPython's argument splitting keeps the quotes of ``--where "age > 50"``."""
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and text[0] not in text[1:-1]:
        return text[1:-1]
    return text


def parse_args(magic: Any, line: str) -> Any:
    """``line`` parsed by ``magic``'s ``@argument``s, each text value unquoted (``--name "my run"`` is ``my run``)."""
    args = parse_argstring(magic, line)
    for name, value in vars(args).items():
        if isinstance(value, str):
            setattr(args, name, unquoted(value))
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            setattr(args, name, [unquoted(v) for v in value])
    return args


class Once:
    """``make()``'s value, made by the first caller of :meth:`get`; a caller on another thread meanwhile waits for
    it (a run's end is told from its follower thread and from the thread that waits for it)."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._made = False
        self._value: Any = None

    def get(self) -> Any:
        with self._lock:
            if not self._made:
                self._value, self._made = self._make(), True
            return self._value


def with_explanation(bundle: dict[str, str], explanation: Explanation | None) -> dict[str, str]:
    """A failed run's static copy with what its re-run on a site's mock said (plain text, the traceback as is)."""
    if explanation is None:
        return bundle
    text = explanation.text
    return {
        **bundle,
        "text/html": f'{bundle["text/html"]}<pre class="flip-mock-explanation">{html.escape(text)}</pre>',
        "text/plain": f"{bundle['text/plain']}\n\n{text}",
    }


def show_run(handle: RunHandle, explain: Callable[[RunHandle], Explanation | None] | None = None) -> RunWidget:
    """The live widget; when the run ends it is replaced by a static copy of itself (an SVG chart, the final
    metrics and the sites' table), which papermill, nbconvert and a code host's viewer keep and show. The copy is
    sent from the follower thread (a live frontend) and again from the thread that waits for the run: papermill
    keeps only what arrives from the cell it is executing. A run that failed at a site is then re-run there on its
    mock by ``explain`` (once), and the copy shows what that said."""
    widget = RunWidget(handle.name, handle.run_id, handle.rounds)
    explained = Once(lambda: explain(handle)) if explain is not None else None

    def refresh(h: RunHandle) -> None:
        widget.update(
            status=h.status,
            round_=h.round,
            points=h.chart_points(),
            sites=h.site_rows(),
            message=h.reason or h.connection_note,
        )

    handle.subscribe(refresh)
    shown = display(widget, display_id=True)

    def leave_static(h: RunHandle) -> None:
        refresh(h)
        bundle = widget.static_bundle()
        shown.update(bundle, raw=True)
        if explained is not None and h.status == RunStatus.FAILED:
            shown.update(with_explanation(bundle, explained.get()), raw=True)

    handle.when_ended(leave_static)
    return widget


@magics_class
class FlipMagics(Magics):
    client: FlipClient | None = None

    def _client(self) -> FlipClient:
        if self.client is None:
            self.client = FlipClient.from_environment()
        return self.client

    def _user_ns(self) -> dict[str, Any]:
        assert self.shell is not None  # a registered magic always has its shell
        namespace: dict[str, Any] = self.shell.user_ns
        return namespace

    @line_magic
    @magic_arguments()
    @argument(
        "url",
        nargs="?",
        default=None,
        help="coordinator URL (default: this hub's coordinator, or the local federation)",
    )
    @argument("--token", default=None, help="API token (default: your hub token, or the local connection file's)")
    @argument("--project", default=None, help="the FLIP project to work in, if you are in more than one")
    @_friendly
    def flip_connect(self, line: str) -> None:
        """Connect this notebook to a FLIP coordinator."""
        args = parse_args(self.flip_connect, line)
        if args.url is None:
            client = FlipClient.from_environment(args.project)
            if args.token:
                client = FlipClient(client.url, args.token, project=args.project)
        elif args.token is None:
            raise NotConnected("give the coordinator's token: %flip_connect URL --token T")
        else:
            client = FlipClient(args.url, args.token, project=args.project)
        who = client.whoami()
        self.client = client
        print(f"connected to {client.url} as {who['researcher']} (project {who['project']})")

    @line_magic
    @magic_arguments()
    @argument("--datasets", action="store_true", help="each dataset's columns, types and missing values at each site")
    @_friendly
    def flip_sites(self, line: str) -> pd.DataFrame:
        """The federation's sites and their datasets."""
        client = self._client()
        if parse_args(self.flip_sites, line).datasets:
            inclusion = client.inclusion()
            if len(inclusion):  # imaging datasets: how many cases each site can use, and why not the others
                display(inclusion)
            return client.datasets()
        return client.site_table()

    @cell_magic
    @magic_arguments()
    @argument("--dataset", required=True, help="dataset name, as %%flip_sites lists it")
    @argument("--rounds", type=int, default=1)
    @argument("--strategy", default="fedavg", help="fedavg, fedprox, fedadam or fedyogi")
    @argument("--min-sites", type=int, default=None, help="fewest sites the run may go on with (default: all)")
    @argument(
        "--round-timeout",
        type=float,
        default=None,
        help="seconds a round waits for sites; a site that is later sits that round out (default: no limit)",
    )
    @argument(
        "--dp-epsilon",
        type=float,
        default=None,
        help="differential privacy: the run's epsilon budget at each site (each site adds the noise)",
    )
    @argument(
        "--dp-clip", type=float, default=None, help="differential privacy: L2 clip of each site's update (default 1.0)"
    )
    @argument("--cohort", default=None, help="train on the rows of this cohort (%%flip_cohort), not the whole table")
    @argument(
        "--covariates",
        default=None,
        help="an OMOP dataset's per-person table, declared in a JSON file (demographics, concept features, outcome)",
    )
    @argument(
        "--mock", action="store_true", help="run the cell here against every site's synthetic mock (nothing is sent)"
    )
    @argument("--seed", type=int, default=0)
    @argument("--name", default=None, help="a name for the run")
    @argument("--out", default=DEFAULT_OUT, help=f"variable that receives the run (default: {DEFAULT_OUT})")
    @argument("--config", nargs="*", default=[], help="key=value pairs passed to train and evaluate")
    @argument(
        "--metrics",
        default=None,
        help="the metric names train and evaluate return, comma-separated (default: read from the dicts they "
        "return); no other name leaves a site",
    )
    @_friendly
    def flip_train(self, line: str, cell: str) -> None:
        """Train the cell's model across the sites holding --dataset; returns at once."""
        args = parse_args(self.flip_train, line)
        handle = self._client().train(
            cell,
            dataset=args.dataset,
            rounds=args.rounds,
            strategy=args.strategy,
            min_sites=args.min_sites,
            seed=args.seed,
            name=args.name,
            config=parse_config(args.config),
            round_timeout=args.round_timeout,
            dp_epsilon=args.dp_epsilon,
            dp_clip=args.dp_clip,
            cohort=args.cohort,
            covariates=None if args.covariates is None else read_text(args.covariates, "covariate specification"),
            mock=args.mock,
            metrics=None if args.metrics is None else [n.strip() for n in args.metrics.split(",") if n.strip()],
        )
        self._user_ns()[args.out] = handle
        show_run(handle, explain=None if args.mock else self._client().explain_failure)

    @line_cell_magic
    @magic_arguments()
    @argument("dataset", help="dataset name, as %%flip_sites lists it")
    @argument("statistic", nargs="+", help=STATISTIC_HELP)
    @argument("--where", default="", help='the cohort: e.g. "age > 50 and sex = 1" (in %%%%flip_query: the cell)')
    @argument("--bins", type=int, default=10, help="hist: the number of bins; top: how many concepts each site names")
    @argument("--range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="hist: the bins' range")
    @argument("--sites", nargs="+", default=None, help="ask only these sites (default: every online site)")
    @argument("--threshold", type=int, default=None, help="this query's disclosure threshold (raises the sites')")
    @argument("--cohort", default=None, help="ask within this frozen cohort (%%flip_cohort): its persons only")
    @argument("--out", default="flip_query", help="variable that receives the result (default: flip_query)")
    @_friendly
    def flip_query(self, line: str, cell: str | None = None) -> QueryResult:
        """A federated statistic over the rows of a dataset that match a filter; each site releases what it may."""
        args = parse_args(self.flip_query, line)
        kind, columns = parse_statistic(args.statistic)
        where = " ".join(cell.split()) if cell is not None and cell.strip() else args.where
        text = f"{args.dataset} {' '.join(args.statistic)}" + (f" where {where}" if where else "")
        text += f" within cohort {args.cohort}" if args.cohort else ""
        result = self._client().query(
            args.dataset,
            kind,
            columns,
            where,
            bins=args.bins,
            range=None if args.range is None else (args.range[0], args.range[1]),
            sites=args.sites,
            threshold=args.threshold,
            text=text,
            cohort=args.cohort,
        )
        self._user_ns()[args.out] = result
        return result

    @line_cell_magic
    @magic_arguments()
    @argument("name", help="the cohort's name, for %%%%flip_train --cohort NAME")
    @argument("--dataset", required=True, help="dataset name, as %%flip_sites lists it")
    @argument("--where", default="", help='which rows: e.g. "age > 50" (in %%%%flip_cohort: the cell)')
    @argument("--sites", nargs="+", default=None, help="freeze it only at these sites (default: every online site)")
    @argument("--circe", default=None, help="an OHDSI Circe cohort definition (ATLAS's JSON), for an OMOP database")
    @argument("--out", default="flip_cohort", help="variable that receives the result (default: flip_cohort)")
    @_friendly
    def flip_cohort(self, line: str, cell: str | None = None) -> QueryResult:
        """Freeze the rows of a dataset that match a filter, at each site, as a named cohort to train on."""
        args = parse_args(self.flip_cohort, line)
        where = " ".join(cell.split()) if cell is not None and cell.strip() else args.where
        circe = None if args.circe is None else read_text(args.circe, "Circe definition")
        result = self._client().cohort(args.name, args.dataset, where, sites=args.sites, circe=circe)
        self._user_ns()[args.out] = result
        return result

    @line_cell_magic
    @magic_arguments()
    @argument("kind", choices=["glm"], help="glm: a generalised linear model, fitted exactly across the sites")
    @argument("formula", nargs="*", help='e.g. "I(num > 0) ~ age + sex + C(cp)" (in %%%%flip_model: the cell)')
    @argument("--dataset", required=True, help="dataset name, as %%flip_sites lists it")
    @argument("--family", default="gaussian", choices=["gaussian", "binomial", "poisson"], help="default: gaussian")
    @argument("--where", default="", help='which rows: e.g. "age > 50"')
    @argument("--cohort", default=None, help="within this frozen cohort (%%flip_cohort)")
    @argument("--sites", nargs="+", default=None, help="fit it over these sites only (default: every online site)")
    @argument("--threshold", type=int, default=None, help="this model's disclosure threshold (raises the sites')")
    @argument("--covariates", default=None, help="within an OMOP cohort: a covariate specification file (JSON)")
    @argument("--out", default="flip_model", help="variable that receives the result (default: flip_model)")
    @_friendly
    def flip_model(self, line: str, cell: str | None = None) -> None:
        """A model fitted across the sites: its coefficients, each site's rows, and a forest plot."""
        args = parse_args(self.flip_model, line)
        formula = " ".join(cell.split()) if cell is not None and cell.strip() else unquoted(" ".join(args.formula))
        covariates = None if args.covariates is None else read_text(args.covariates, "covariate specification")
        result = self._client().glm(formula, args.dataset, args.family, where=args.where, cohort=args.cohort,
                                    sites=args.sites, threshold=args.threshold, covariates=covariates)  # fmt: skip
        self._user_ns()[args.out] = result
        display(result)
        display(Image(png(result.plot())))  # static: an executed notebook keeps it

    @line_cell_magic
    @magic_arguments()
    @argument("kind", choices=["km", "cox"], help="km: Kaplan-Meier curves and the log-rank test; cox: a Cox model")
    @argument("terms", nargs="*", help='cox: the covariates, e.g. "age + C(arm)" (in %%%%flip_survival: the cell)')
    @argument("--dataset", required=True, help="dataset name, as %%flip_sites lists it")
    @argument("--time", required=True, help="the time column (at least zero): until the event or censoring")
    @argument("--event", required=True, help="the event column: 1, the event; 0, censored then")
    @argument("--edges", type=float, nargs="+", default=[], help="km, cox --binned: the time bins' edges, increasing")
    @argument("--group", default=None, help="km: a curve per level of this column")
    @argument("--binned", action="store_true", help="cox: one baseline hazard over binned times (default: stratified)")
    @argument("--where", default="", help='which rows: e.g. "age > 50"')
    @argument("--cohort", default=None, help="within this frozen cohort (%%flip_cohort)")
    @argument("--sites", nargs="+", default=None, help="these sites only (default: every online site)")
    @argument("--threshold", type=int, default=None, help="this analysis' disclosure threshold (raises the sites')")
    @argument("--covariates", default=None, help="within an OMOP cohort: a covariate specification file (JSON)")
    @argument("--out", default="flip_survival", help="variable that receives the result (default: flip_survival)")
    @_friendly
    def flip_survival(self, line: str, cell: str | None = None) -> None:
        """Survival across the sites, no exact time leaving one: Kaplan-Meier curves with the numbers at risk, or a
        Cox model's hazard ratios with a forest plot."""
        args = parse_args(self.flip_survival, line)
        terms = " ".join(cell.split()) if cell is not None and cell.strip() else unquoted(" ".join(args.terms))
        common = {
            "where": args.where,
            "cohort": args.cohort,
            "sites": args.sites,
            "threshold": args.threshold,
            "covariates": None if args.covariates is None else read_text(args.covariates, "covariate specification"),
        }
        if args.kind == "km":
            if terms:
                raise UsageError("Kaplan-Meier curves take --group, not terms")
            result: Any = self._client().km(args.dataset, args.time, args.event, args.edges, group=args.group,
                                            **common)  # fmt: skip
        else:
            if args.group is not None:
                raise UsageError("a Cox model takes terms (C(column) for a categorical one), not --group")
            result = self._client().cox(terms, args.dataset, args.time, args.event, binned=args.binned,
                                        edges=args.edges or None, **common)  # fmt: skip
        self._user_ns()[args.out] = result
        display(result)
        display(Image(png(result.plot())))  # static: an executed notebook keeps it

    @line_magic
    @_friendly
    def flip_runs(self, line: str) -> pd.DataFrame:
        """This project's runs."""
        columns = ["run_id", "name", "status", "dataset", "rounds", "strategy", "researcher", "created", "reason"]
        frame = pd.DataFrame(self._client().runs(), columns=columns)
        frame["created"] = pd.to_datetime(frame["created"], unit="s")
        return frame

    @line_magic
    @magic_arguments()
    @argument("run_a")
    @argument("run_b")
    @_friendly
    def flip_compare(self, line: str) -> pd.DataFrame:
        """Two runs side by side: the inputs that changed, a figure of their metrics, every metric in a table."""
        args = parse_args(self.flip_compare, line)
        client = self._client()
        comparison = compare(record_of(client.run(args.run_a)), record_of(client.run(args.run_b)))
        print(comparison.summary())
        display(Image(png(comparison_figure(comparison))))
        return comparison_frame(comparison)

    @line_magic
    @magic_arguments()
    @argument("run_id")
    @argument("--out", default=DEFAULT_OUT)
    @_friendly
    def flip_attach(self, line: str) -> None:
        """Follow a run again (e.g. after a kernel restart), from its first event."""
        args = parse_args(self.flip_attach, line)
        handle = self._client().attach(args.run_id)
        self._user_ns()[args.out] = handle
        show_run(handle)

    @line_magic
    @magic_arguments()
    @argument("run_id")
    @_friendly
    def flip_stop(self, line: str) -> None:
        """Stop a run."""
        args = parse_args(self.flip_stop, line)
        view = self._client().stop(args.run_id)
        print(f"run {view['run_id']}: {view['status']}")
