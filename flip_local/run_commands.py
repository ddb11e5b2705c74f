"""The researcher's commands for recorded runs: ``flip run`` and ``flip rerun`` (notebooks under papermill),
``flip runs`` and ``flip show`` (the records), ``flip compare`` (two records side by side), ``flip export``
(a run's model with its card). Each talks to the connected federation, or to a hub given ``--url`` and a
headless token (``flip token add``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from flip_core.records import compare
from flip_core.runs import record_of
from flip_local.exits import FlipExit


def add_parsers(sub: Any) -> None:
    run = sub.add_parser("run", help="execute a notebook with papermill in the FLIP kernel, keeping its runs' records")
    run.add_argument("notebook", type=Path)
    _parameters(run)
    rerun = sub.add_parser("rerun", help="execute a recorded run's notebook again and compare every metric")
    rerun.add_argument("run_id")
    _parameters(rerun)
    runs = sub.add_parser("runs", help="the project's runs")
    runs.add_argument("--json", action="store_true", help="machine-readable output")
    show = sub.add_parser("show", help="one run's record")
    show.add_argument("run_id")
    show.add_argument("--json", action="store_true", help="the whole record as JSON")
    comparison = sub.add_parser("compare", help="two runs' metrics side by side, and the inputs that changed")
    comparison.add_argument("run_a")
    comparison.add_argument("run_b")
    export = sub.add_parser("export", help="a run's model: safetensors weights, its cell, a model card, a probe check")
    export.add_argument("run_id")
    export.add_argument("dir", type=Path)
    airlock = sub.add_parser("airlock", help="your requests to the sites' airlocks, and the items they released")
    acts = airlock.add_subparsers(dest="action", required=True)
    listing = acts.add_parser("list", help="your requests and their states")
    get = acts.add_parser("get", help="a released item, its site's signature checked (to stdout or --out FILE)")
    get.add_argument("request_id")
    get.add_argument("--out", type=Path, default=None, help="write the item's bytes here")
    for parser in (run, rerun, runs, show, comparison, export, listing, get):
        _connection(parser)


def _parameters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="a notebook parameter (papermill's; repeatable)",
    )
    parser.add_argument("--out", type=Path, default=None, help="where the results go (default: runs/NOTEBOOK-TIME)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a hub's coordinator (default: the local federation)")
    parser.add_argument("--token", default=None, help="with --url: a headless token (flip token add)")
    parser.add_argument("--project", default=None, help="the project to act in, if the token has several")


def _client(args: argparse.Namespace) -> Any:
    from flip_core.errors import NotConnected
    from flip_magics.client import ENV_API_TOKEN, ENV_API_URL, ENV_PROJECT, FlipClient

    if args.url is None:
        return FlipClient.from_environment(args.project)
    if not args.token:
        raise NotConnected("--url needs --token (a headless token: flip token add RESEARCHER --project P)")
    os.environ.update({ENV_API_URL: args.url, ENV_API_TOKEN: args.token})  # the notebook's kernel inherits them
    if args.project:
        os.environ[ENV_PROJECT] = args.project
    return FlipClient(args.url, args.token, project=args.project)


def _run(args: argparse.Namespace) -> int:
    from flip_local.notebook_runs import parse_value, run_notebook

    parameters = {name: parse_value(value) for name, value in args.parameter}
    client = _client(args)
    execution = run_notebook(args.notebook, parameters, args.out, client=client, progress=not args.no_progress)
    print(f"executed notebook: {execution.executed}")
    for run_id in execution.runs:
        record = execution.records.get(run_id)
        print(f"run {run_id}: {record.status if record else '?'}  {execution.out / 'records' / (run_id + '.json')}")
    _pending(client)
    return FlipExit.OK


def _pending(client: Any) -> None:
    """The caller's airlock requests still waiting for a site's review, or released and not yet fetched."""
    from flip_core.errors import FlipError

    try:
        waiting = [r for r in client.requests() if r.state in ("pending", "released")]
    except FlipError as exc:
        print(f"airlock: could not list your requests ({exc})")
        return
    for request in waiting:
        print(f"airlock: {request.sentence()}")


def _airlock(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.action == "list":
        requests = client.requests()
        if not requests:
            print("no airlock request of yours in this project")
        for request in requests:
            print(request.sentence())
            print(f"    purpose: {request.purpose}")
        return FlipExit.OK
    item = client.released(args.request_id)
    print(item.caption(), file=sys.stderr)
    if args.out is not None:
        args.out.write_bytes(item.content)
        print(f"wrote {len(item.content)} bytes to {args.out}", file=sys.stderr)
    else:
        sys.stdout.buffer.write(item.content)
    return FlipExit.OK


def _rerun(args: argparse.Namespace) -> int:
    from flip_local.notebook_runs import parse_value, rerun

    overrides = {name: parse_value(value) for name, value in args.parameter}
    comparison, execution = rerun(args.run_id, overrides, args.out, client=_client(args), progress=not args.no_progress)
    print(comparison.summary())
    print(f"executed notebook: {execution.executed}")
    print(f"comparison:        {execution.out / 'comparison.json'}")
    return FlipExit.OK if comparison.identical else FlipExit.DIFFERENT


def _runs(args: argparse.Namespace) -> int:
    runs = _client(args).runs()
    if args.json:
        print(json.dumps(runs, indent=2))
        return FlipExit.OK
    print(f"{'run':<11} {'status':<10} {'name':<24} {'dataset':<16} {'rounds':>6}  {'researcher':<12} created")
    for r in sorted(runs, key=lambda r: r["created"]):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"]))
        print(
            f"{r['run_id']:<11} {r['status']:<10} {r['name'][:24]:<24} {r['dataset'][:16]:<16} {r['rounds']:>6}  "
            f"{r['researcher'][:12]:<12} {created}"
        )
    return FlipExit.OK


def _show(args: argparse.Namespace) -> int:
    from flip_local.record_text import describe

    record = record_of(_client(args).run(args.run_id))
    print(json.dumps(record.as_dict(), indent=2) if args.json else describe(record))
    return FlipExit.OK


def _compare(args: argparse.Namespace) -> int:
    client = _client(args)
    comparison = compare(record_of(client.run(args.run_a)), record_of(client.run(args.run_b)))
    print(comparison.summary())
    for row in comparison.differing[:20]:
        print(
            f"  round {row['round']:>3} {row['site']:<14} {row['phase']} {row['metric']}: {row['a']!r} → {row['b']!r}"
        )
    if len(comparison.differing) > 20:
        print(f"  … and {len(comparison.differing) - 20} more")
    return FlipExit.OK if comparison.identical else FlipExit.DIFFERENT


def _export(args: argparse.Namespace) -> int:
    from flip_magics.export import export_model, verify_export
    from flip_magics.task import load_weights, prepare

    client = _client(args)
    view = client.run(args.run_id)
    if view["status"] != "completed":
        print(f"flip: run {args.run_id} is {view['status']}: only a completed run has a model", file=sys.stderr)
        return FlipExit.FAILED
    record = record_of(view)
    task = prepare(view["source"], seed=record.seed)
    model = load_weights(task, client.model_params(args.run_id))
    folder = export_model(args.dir, model=model, source=view["source"], record=record)
    check = verify_export(folder)
    print(f"exported run {args.run_id} to {folder}")
    print(f"probe check: the folder alone gives the run's output (largest difference {check['max_abs_diff']})")
    return FlipExit.OK


COMMANDS = {
    "run": _run,
    "rerun": _rerun,
    "runs": _runs,
    "show": _show,
    "compare": _compare,
    "export": _export,
    "airlock": _airlock,
}

__all__ = ["COMMANDS", "add_parsers"]
