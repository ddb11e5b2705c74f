"""``flip-site``: the site admin's command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from site_agent.catalog import FORMATS, CatalogError, add_dataset, init_site, load_site


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flip-site", description="Run and manage a FLIP site (a hospital).")
    sub = parser.add_subparsers(dest="command", required=True)

    init = sub.add_parser("init", help="create a site directory")
    init.add_argument("dir", type=Path)
    init.add_argument("--name", required=True, help="the site's name, as researchers will see it")

    dataset = sub.add_parser("dataset", help="register and list datasets").add_subparsers(dest="action", required=True)
    add = dataset.add_parser("add", help="register a table held at this site")
    add.add_argument("dir", type=Path)
    add.add_argument("name")
    add.add_argument("path", type=Path)
    add.add_argument("--format", required=True, choices=FORMATS)
    add.add_argument("--train-fraction", type=float, default=0.8, help="share of rows in the train split")
    add.add_argument("--split-seed", type=int, default=0, help="seed of the recorded train/test split")
    add.add_argument("--stratify", default=None, help="column to stratify the split on")
    listing = dataset.add_parser("list", help="show registered datasets")
    listing.add_argument("dir", type=Path)
    listing.add_argument("--json", action="store_true")

    start = sub.add_parser("start", help="join a federation and serve tasks")
    start.add_argument("dir", type=Path)
    start.add_argument("--superlink", default=None, help="HOST:PORT of the federation's SuperLink fleet API")
    start.add_argument("--coordinator", default=None, help="URL of the coordinator (default: local connection file)")
    start.add_argument("--token", default=None, help="the federation's site join token (default: local connection file)")
    start.add_argument("--warm-seconds", type=float, default=None,
                       help="keep a spare task process (torch loaded, ~300 MB) this long after start or the last "
                            "step, so that a new run starts at once (default: 900; 0: never)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except CatalogError as exc:
        print(f"flip-site: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "init":
        site = init_site(args.dir, args.name)
        print(f"site {site.name!r} created in {site.root}")
        return 0
    if args.command == "dataset" and args.action == "add":
        site = add_dataset(load_site(args.dir), args.name, args.path, args.format,
                           train_fraction=args.train_fraction, split_seed=args.split_seed,
                           stratify=args.stratify)
        entry = site.datasets[args.name]
        print(f"dataset {entry.name!r}: {entry.rows} rows ({entry.train_rows} train / {entry.test_rows} test), "
              f"{len(entry.columns)} columns, {entry.fingerprint[:19]}…")
        return 0
    if args.command == "dataset" and args.action == "list":
        site = load_site(args.dir)
        if args.json:
            print(json.dumps([d.summary() for d in site.datasets.values()], indent=2))
        else:
            for d in site.datasets.values():
                print(f"{d.name}\t{d.format}\t{d.rows} rows\t{d.fingerprint[:19]}…")
        return 0
    if args.command == "start":
        return _start(args)
    raise AssertionError(args)


def _start(args: argparse.Namespace) -> int:
    from coordinator.local import read_connection
    from site_agent.agent import WARM_SECONDS, SiteAgent

    site = load_site(args.dir)
    connection = read_connection() or {}
    superlink = args.superlink or connection.get("superlink")
    coordinator = args.coordinator or connection.get("coordinator_url")
    token = args.token or connection.get("site_token")
    missing = [flag for flag, value in (("--superlink", superlink), ("--coordinator", coordinator),
                                        ("--token", token)) if not value]
    if missing:
        print(f"flip-site: no local federation found; give {', '.join(missing)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site.name} %(levelname)s %(message)s")
    warm = WARM_SECONDS if args.warm_seconds is None else args.warm_seconds
    return SiteAgent(site, superlink, coordinator, token, warm_seconds=warm).run()


if __name__ == "__main__":
    sys.exit(main())
