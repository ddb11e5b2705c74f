"""``flip``: the command line of a hub operator and of a researcher on one machine: the local federation
(``up``, ``down``, ``status``, ``restart``, ``hub``, ``demo``), the hub side of a real one (``serve``,
``certs``, ``site register``, ``token``), the public data sets and the FLIP kernel, and recorded runs
(``run``, ``rerun``, ``runs``, ``show``, ``compare``, ``export``: ``flip_local.run_commands``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from flip_core.exits import help_epilog
from flip_local import run_commands
from flip_local.exits import FlipExit

FLAMBY = {"FedAvg": 0.685, "Pooled": 0.735}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip",
        description="FLIP: federated research from Jupyter.",
        epilog=help_epilog(FlipExit),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _local_commands(sub)
    _hub_side_commands(sub)
    _tool_commands(sub)
    run_commands.add_parsers(sub)
    return parser


def _local_commands(sub: Any) -> None:
    """The local federation: up, hub, down, restart, status, demo."""
    up = sub.add_parser("up", help="start a local federation (SuperLink, coordinator, four hospital sites)")
    up.add_argument(
        "--data", type=Path, default=None, help="folder holding the demo's files (heart-disease, or BreastMNIST.npz)"
    )
    up.add_argument(
        "--demo",
        choices=("heart", "imaging", "omop"),
        default="heart",
        help="the sites' data: the four heart-disease hospitals, BreastMNIST's images over three sites, or OHDSI's "
        "Eunomia GiBleed in three hospitals' OMOP databases on a PostgreSQL of the federation's own",
    )
    up.add_argument(
        "--sites",
        type=int,
        default=4,
        help="number of site agents (beyond four, copies of the hospitals' data: for scale tests)",
    )
    up.add_argument(
        "--cold",
        action="store_true",
        help="sites keep no spare task process (less memory; a run's first round starts them)",
    )
    up.add_argument(
        "--require-approval",
        action="store_true",
        help="sites run a task's code only once their admin approves it (flip-site approve); "
        "by default the local sites auto-approve project 'default' (development)",
    )
    up.add_argument(
        "--listen",
        default="127.0.0.1",
        help="address of the sites' one entry (the fleet front); 0.0.0.0 for sites on other hosts",
    )
    up.add_argument(
        "--hub-name",
        action="append",
        default=[],
        help="a name or address sites use to reach this hub (in its TLS certificate; repeatable)",
    )
    up.add_argument(
        "--front",
        choices=["python", "nginx"],
        default="python",
        help="the fleet front: FLIP's own (default) or nginx with the same allow list (apt-get install nginx-light)",
    )
    up.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP between hub and sites and no node authentication: for debugging only",
    )
    hub = sub.add_parser("hub", help="a local JupyterHub with the demo federation (development; log in as alice)")
    hub.add_argument("--port", type=int, default=0, help="the hub's port on 127.0.0.1 (default: a free one)")
    hub.add_argument("--password", default="", help="the development login's password (default: a new one)")
    hub.add_argument("--data", type=Path, default=None, help="folder holding the heart-disease files")
    hub.add_argument(
        "--notebooks",
        type=Path,
        default=None,
        help="notebooks copied into each user's home (default: this checkout's notebooks/)",
    )
    sub.add_parser("down", help="stop the local federation")
    restart = sub.add_parser("restart", help="kill one process of the local federation and start it again")
    restart.add_argument("name", help="coordinator, superlink or site-NAME (as `flip status` lists them)")
    status = sub.add_parser("status", help="show the local federation")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    demo = sub.add_parser("demo", help="bring a federation up, run the quickstart notebook, report")
    demo.add_argument("--rounds", type=int, default=None)
    demo.add_argument("--out", type=Path, default=None, help="where to put the executed notebook")


def _hub_side_commands(sub: Any) -> None:
    """The hub side of a real federation: serve, certs, site register, token."""
    serve = sub.add_parser(
        "serve",
        help="the hub side of a real federation, in the foreground (a container's "
        "command): SuperLink, coordinator, fleet front; state kept in --state",
    )
    serve.add_argument(
        "--state",
        type=Path,
        required=True,
        help="kept across restarts: CA, registered sites, runs, models (a volume in a container)",
    )
    serve.add_argument("--listen", default="0.0.0.0", help="the fleet front's address (the sites' one entry)")
    serve.add_argument("--fleet-port", type=int, default=9092)
    serve.add_argument(
        "--front",
        choices=["python", "nginx"],
        default="python",
        help="the fleet front: FLIP's own (default) or nginx with the same allow list (nginx-light installed)",
    )
    serve.add_argument(
        "--coordinator-listen",
        default="127.0.0.1",
        help="the researchers' API (0.0.0.0 in a container on the hub's private network)",
    )
    serve.add_argument("--coordinator-port", type=int, default=8900)
    serve.add_argument(
        "--hub-name",
        action="append",
        default=[],
        help="a name or address sites use to reach this hub (in its TLS certificate; repeatable)",
    )
    certs = sub.add_parser("certs", help="make the consortium's CA and the hub's TLS certificate")
    certs.add_argument("dir", type=Path, help="where the CA and certificates go (keep ca.key offline)")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="a name or address sites use to reach the hub's fleet address (repeatable)",
    )
    certs.add_argument("--name", default="superlink", help="the certificate's file name (default: superlink)")
    site = sub.add_parser("site", help="sites of the federation").add_subparsers(dest="action", required=True)
    register = site.add_parser("register", help="let a site join: register its public key, print its token")
    register.add_argument("name", help="the site's name, as its site.toml gives it")
    register.add_argument("key", type=Path, help="the site's public key (flip-site keygen made it)")
    register.add_argument(
        "--config", type=Path, default=None, help="the coordinator's config (default: the local federation's)"
    )
    register.add_argument("--replace", action="store_true", help="the site has a new key: a new token too")
    token = sub.add_parser(
        "token", help="headless tokens (scripts, papermill outside a hub): one researcher, one project"
    ).add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "make a token (printed once)"),
        ("revoke", "drop a researcher's tokens in a project"),
        ("list", "who holds tokens, in which project"),
    ):
        one = token.add_parser(action, help=text)
        if action != "list":
            one.add_argument("researcher")
            one.add_argument("--project", required=True)
        one.add_argument(
            "--config", type=Path, default=None, help="the coordinator's config (default: the local federation's)"
        )


def _tool_commands(sub: Any) -> None:
    """The FLIP kernel and the public data sets."""
    kernel = sub.add_parser("kernel", help="the FLIP Jupyter kernel").add_subparsers(dest="action", required=True)
    install = kernel.add_parser("install", help='install the "FLIP (Python 3)" kernel spec (magics preloaded)')
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="for this user (default: this environment)")
    where.add_argument("--prefix", default=None, help="under PREFIX/share/jupyter/kernels")
    data = sub.add_parser("data", help="public datasets").add_subparsers(dest="action", required=True)
    fetch = data.add_parser("fetch", help="download a dataset from its public source and check it")
    fetch.add_argument("name")
    fetch.add_argument("--dest", type=Path, default=None)
    verify = data.add_parser("verify", help="check a dataset's files against their published digests")
    verify.add_argument("name")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from flip_core.errors import FlipError

    try:
        return _COMMANDS[args.command](args)
    except FlipError as exc:
        print(f"flip: {exc}", file=sys.stderr)
        return FlipExit.FAILED


def _serve(args: argparse.Namespace) -> int:
    from coordinator.serve import serve

    return serve(
        args.state,
        listen=args.listen,
        fleet_port=args.fleet_port,
        coordinator_listen=args.coordinator_listen,
        coordinator_port=args.coordinator_port,
        hub_names=[n for n in args.hub_name if n],
        front=args.front,
    )


def _down(args: argparse.Namespace) -> int:
    from flip_local.federation import down

    stopped = down()
    print("stopped: " + ", ".join(stopped) if stopped else "no local federation was running")
    return FlipExit.OK


def _restart(args: argparse.Namespace) -> int:
    from flip_local.federation import restart

    print(f"{args.name} restarted (pid {restart(args.name)})")
    return FlipExit.OK


def _kernel(args: argparse.Namespace) -> int:
    from flip_magics.kernelspec import DISPLAY_NAME, install

    print(f"{DISPLAY_NAME} installed in {install(user=args.user, prefix=args.prefix)}")
    return FlipExit.OK


def _local_config(given: Path | None) -> Path:
    """The coordinator config a hub operator's command acts on: ``--config``, else the local federation's."""
    from flip_core.paths import flip_home
    from flip_local.processes import Federation

    return given or Federation(flip_home()).root / "coordinator.json"


def _up(args: argparse.Namespace) -> int:
    from flip_core.paths import connection_path
    from flip_local.federation import up

    connection = up(
        data=args.data,
        sites=args.sites,
        warm=not args.cold,
        auto_approve=not args.require_approval,
        secure=not args.insecure,
        listen=args.listen,
        hub_names=tuple(args.hub_name),
        front=args.front,
        demo=args.demo,
    )
    print(f"FLIP federation up in {connection['started_seconds']} s")
    print(f"  coordinator  {connection['coordinator_url']}")
    print(
        f"  sites join   {connection['superlink']}  (the fleet front: TLS, fleet API and site routes only)"
        if connection["secure"]
        else f"  sites join   {connection['superlink']}  (INSECURE: plain HTTP, any node)"
    )
    if connection["secure"]:
        print(f"  CA           {connection['ca']}  (a new site: flip-site keygen, flip site register, flip-site join)")
    print(f"  connection   {connection_path()}  (notebooks: %load_ext flip_magics, %flip_connect)")
    return FlipExit.OK


def _hub(args: argparse.Namespace) -> int:
    from flip_local.federation import HubOptions, up

    notebooks = args.notebooks or Path(__file__).resolve().parents[1] / "notebooks"
    options = HubOptions(password=args.password, port=args.port, notebooks=notebooks if notebooks.is_dir() else None)
    connection = up(data=args.data, hub=options)
    hub = connection["hub"]
    print(f"FLIP hub up in {connection['started_seconds']} s: JupyterHub, its coordinator service, four hospital sites")
    print(f"  JupyterHub   {hub['url']}/")
    for user in hub["users"]:
        groups = [g for g, members in hub["groups"].items() if user in members]
        print(f"    log in as {user:<6} password {hub['password']}   groups: {', '.join(groups) or 'none'}")
    print(f"  notebooks    {notebooks}  (copied into each user's home)" if options.notebooks else "")
    print("  stop with    flip down")
    return FlipExit.OK


def _certs(args: argparse.Namespace) -> int:
    from flip_core.certs import fingerprint, load_ca, make_ca, make_server_cert

    ca = load_ca(args.dir) if (args.dir / "ca.pem").exists() else make_ca(args.dir)
    server = make_server_cert(args.dir, args.name, args.host)
    print(f"consortium CA   {ca.cert}  ({fingerprint(ca.cert)}; its key {ca.key} signs certificates: keep it offline)")
    print(f"hub certificate {server.cert} and {server.key} for {', '.join(args.host)}")
    print(f"sites get {ca.cert} (flip-site join --ca)")
    return FlipExit.OK


def _register(args: argparse.Namespace) -> int:
    from coordinator.enrolment import register_site

    node_id, token = register_site(args.name, args.key, _local_config(args.config), replace=args.replace)
    print(f"site {args.name} registered: Flower node {node_id}")
    print(f"its token (shown once; send it to the site with the CA certificate): {token}")
    print(f"the site runs: flip-site join DIR --fleet HUB:PORT --ca ca.pem --token {token}")
    return FlipExit.OK


def _token(args: argparse.Namespace) -> int:
    from coordinator.config import CoordinatorConfig, add_token, revoke_tokens
    from coordinator.registry import RegistryError

    path = _local_config(args.config)
    if not path.exists():
        raise RegistryError(f"no coordinator config at {path} (give --config)")
    if args.action == "add":
        print(
            f"a headless token for {args.researcher} in project {args.project} (shown once; the coordinator "
            f"takes it at once): {add_token(path, args.researcher, args.project)}"
        )
    elif args.action == "revoke":
        count = revoke_tokens(path, args.researcher, args.project)
        print(f"revoked {count} token(s) of {args.researcher} in project {args.project}")
        return FlipExit.OK if count else FlipExit.FAILED
    else:
        for grant in sorted(set(CoordinatorConfig.load(path).tokens.values()), key=lambda g: (g.project, g.researcher)):
            print(f"{grant.project:<16} {grant.researcher}")
    return FlipExit.OK


def _status(args: argparse.Namespace) -> int:
    from flip_local.federation import status

    info = status()
    if args.json:
        print(json.dumps(info, indent=2))
        return FlipExit.OK if info["running"] else FlipExit.FAILED
    if not info["running"]:
        print("no local federation is running (`flip up` starts one)")
        return FlipExit.FAILED
    print(f"coordinator  {info['coordinator_url']}\nsites join   {info['superlink']}")
    for site in info["sites"]:
        datasets = ", ".join(f"{d['name']} ({d['rows']} rows)" for d in site["datasets"])
        print(f"  {site['site']:<14} {site['status']:<8} {datasets}")
    if "error" in info:
        print(info["error"])
    return FlipExit.OK


def _data(args: argparse.Namespace) -> int:
    from flip_core.paths import data_dir
    from flip_local.data_fetch import fetch, verify

    if args.action == "verify":
        problems = verify(args.name, data_dir())
        for problem in problems:
            print(problem)
        print(f"{args.name}: {'OK' if not problems else 'problems found'} in {data_dir()}")
        return FlipExit.OK if not problems else FlipExit.FAILED
    paths = fetch(args.name, args.dest or data_dir())
    for path in paths:
        print(path)
    return FlipExit.OK


def _demo(args: argparse.Namespace) -> int:
    from flip_core.paths import flip_home
    from flip_local.federation import Federation, down, up
    from flip_local.notebook_runs import run_notebook
    from flip_magics.client import FlipClient

    repo = Path(__file__).resolve().parents[1]
    notebook = repo / "notebooks" / "01_quickstart_heart.ipynb"
    out_dir = (args.out or repo / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    ours = not Federation(flip_home()).running()
    if ours:
        print("starting a local federation: SuperLink, coordinator, Cleveland, Hungary, Switzerland, VA …", flush=True)
        print(f"federation up in {up()['started_seconds']} s", flush=True)
    else:
        print(f"using the federation already running under {flip_home()}", flush=True)
    print(f"running {notebook.name} with papermill (flip run) …", flush=True)
    parameters: dict[str, object] = {"rounds": args.rounds} if args.rounds else {}
    try:
        execution = run_notebook(notebook, parameters, out_dir, client=FlipClient.from_environment(), progress=False)
    finally:
        if ours:
            down()
    summary = json.loads((out_dir / "summary.json").read_text())
    print()
    print(
        f"run {summary['run_id']}: {summary['rounds']} rounds of {summary['strategy']}, "
        f"{summary['seconds_per_round']:.1f} s per round"
    )
    for site, acc in summary["site_accuracy"].items():
        print(f"  {site:<12} test accuracy {acc:.3f}")
    print(
        f"mean per-site test accuracy: {summary['mean_accuracy']:.3f} "
        f"(FLamby FedAvg {FLAMBY['FedAvg']}, pooled {FLAMBY['Pooled']})"
    )
    print(f"executed notebook: {execution.executed}")
    print(f"run record:        {out_dir / 'records' / (summary['run_id'] + '.json')}")
    print(f"exported model:    {out_dir / 'model'} (flip export RUN_ID DIR; `python load.py --check` inside)")
    print(f"summary:           {out_dir / 'summary.json'}")
    return FlipExit.OK


_COMMANDS = {
    "up": _up,
    "hub": _hub,
    "token": _token,
    "serve": _serve,
    "down": _down,
    "restart": _restart,
    "status": _status,
    "data": _data,
    "demo": _demo,
    "certs": _certs,
    "kernel": _kernel,
    "site": _register,
    **run_commands.COMMANDS,
}


if __name__ == "__main__":
    sys.exit(main())
