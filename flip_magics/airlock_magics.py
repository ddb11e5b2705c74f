"""The airlock's magics: ``%flip_request``, ``%flip_requests``, ``%flip_released``; each parses its words and
delegates to :class:`flip_magics.client.FlipClient` (the connection is ``%flip_connect``'s)."""

from __future__ import annotations

from typing import Any

import pandas as pd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments
from IPython.display import Image, display

from flip_magics.airlock import AirlockRequest, EvaluationReport, requests_frame
from flip_magics.client import FlipClient
from flip_magics.magics import FlipMagics, parse_args
from flip_magics.magics import _friendly as friendly
from flip_magics.queries import STATISTIC_HELP, parse_statistic

REQUEST_HELP = (
    "traceback RUN_ID (the full traceback of the run's failed step at the site) | evaluation RUN_ID (the report of "
    "the run's final evaluation there, by the cell's report(model, data, config)) | "
    f"query DATASET STATISTIC (the site's exact answer; STATISTIC: {STATISTIC_HELP})"
)


@magics_class
class AirlockMagics(Magics):
    def _client(self) -> FlipClient:
        assert self.shell is not None
        flip: FlipMagics = self.shell.magics_manager.registry["FlipMagics"]
        return flip._client()

    def _user_ns(self) -> dict[str, Any]:
        assert self.shell is not None
        namespace: dict[str, Any] = self.shell.user_ns
        return namespace

    @line_magic
    @magic_arguments()
    @argument("item", choices=["traceback", "query", "evaluation"], help="what to ask for")
    @argument("words", nargs="+", help=REQUEST_HELP)
    @argument("--site", required=True, help="the one site asked (a person there reviews the item)")
    @argument("--purpose", required=True, help='in a sentence, what it is for: "to see why evaluate() fails at ..."')
    @argument("--where", default="", help="query: the cohort's filter")
    @argument("--bins", type=int, default=10, help="query hist: the number of bins")
    @argument("--range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="query hist: the range")
    @argument("--out", default="flip_request", help="variable that receives the request (default: flip_request)")
    @friendly
    def flip_request(self, line: str) -> None:
        """Ask one site to release an item its rules hold back; a person at the site reviews it byte for byte."""
        args = parse_args(self.flip_request, line)
        client = self._client()
        if args.item in ("traceback", "evaluation"):
            if len(args.words) != 1:
                raise UsageError(f"%flip_request {args.item} takes the run's id: {args.item} RUN --site S --purpose P")
            request = client.request_release(args.item, args.site, args.purpose, run=args.words[0])
        else:
            if len(args.words) < 2:
                raise UsageError(f"%flip_request query takes a dataset and a statistic: {STATISTIC_HELP}")
            kind, columns = parse_statistic(args.words[1:])
            query = {"dataset": args.words[0], "kind": kind, "columns": columns, "where": args.where}
            query.update(bins=args.bins, range=None if args.range is None else list(args.range))
            query["text"] = f"{' '.join(args.words)}" + (f" where {args.where}" if args.where else "")
            request = client.request_release("query", args.site, args.purpose, query=query)
        self._user_ns()[args.out] = request
        print(request.sentence())

    @line_magic
    @friendly
    def flip_requests(self, line: str) -> pd.DataFrame:
        """Your airlock requests in this project, each with its state as its site tells it now."""
        requests: list[AirlockRequest] = self._client().requests()
        return requests_frame(requests)

    @line_magic
    @magic_arguments()
    @argument("request_id")
    @argument("--out", default="flip_released", help="variable that receives the item (default: flip_released)")
    @friendly
    def flip_released(self, line: str) -> Any:
        """A released item, its site's signature checked: a traceback is printed (and bound as text), a query
        result is shown as a DataFrame."""
        args = parse_args(self.flip_released, line)
        item = self._client().released(args.request_id)
        value = item.value
        self._user_ns()[args.out] = value
        print(item.caption())
        if isinstance(value, str):
            print(value)
            return None
        if isinstance(value, EvaluationReport):
            print(value.error or "\n".join(f"{name}: {number:g}" for name, number in value.metrics.items()))
            for name, table in value.tables.items():
                display(table.rename_axis(name))
            for png in value.figures.values():
                display(Image(png))
            return None
        return value
