"""``flip-site``: the site admin's command line."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shutil
import sys
import time
from argparse import SUPPRESS
from pathlib import Path
from typing import Any

from flip_core.airlock import ReleaseState
from flip_core.certs import SITE_KEYS as KEYS
from flip_core.certs import CertError, fingerprint, load_site_keys, make_site_keys
from flip_core.exits import help_epilog
from site_agent.data.catalog import CatalogError, init_site, load_site
from site_agent.data.formats import FORMATS, add_dataset
from site_agent.data.omop import OMOP
from site_agent.data.omop_db import Source
from site_agent.data.omop_db import checks as omop_checks
from site_agent.disclosure.checks import Check, summary, visible
from site_agent.exits import SiteExit
from site_agent.governance.airlock import Airlock, AirlockError
from site_agent.governance.approvals import APPROVED, REJECTED, ApprovalError, ApprovalStore
from site_agent.governance.audit import AuditError, AuditLog, read_records
from site_agent.governance.audit import show as audit_show
from site_agent.governance.audit import verify as audit_verify
from site_agent.governance.policy import PolicyError

FORMAT_OPTIONS = ("stratify", "image_column", "label_column", "mask_column", "patient_column", "skip_bad_files")
JOINED = "federation.json"  # where `flip-site join` records the federation (its token: owner-only)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flip-site",
        description="Run and manage a FLIP site (a hospital).",
        epilog=help_epilog(SiteExit),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _data_commands(sub)
    _admin_commands(sub)
    _federation_commands(sub)
    return parser


def _data_commands(sub: Any) -> None:
    """The site folder and its datasets: init, dataset add|list."""
    init = sub.add_parser("init", help="create a site directory")
    init.add_argument("dir", type=Path)
    init.add_argument("--name", required=True, help="the site's name, as researchers will see it")

    dataset = sub.add_parser("dataset", help="register and list datasets").add_subparsers(dest="action", required=True)
    add = dataset.add_parser(
        "add", help="register a table, a manifest of images (--format images) or an OMOP database (--format omop)"
    )
    add.add_argument("dir", type=Path)
    add.add_argument("name")
    add.add_argument(
        "path", type=Path, help="the table, the images' manifest (a CSV: one row per case) or a database source"
    )
    add.add_argument("--format", required=True, choices=FORMATS.names())
    add.add_argument("--train-fraction", type=float, default=0.8, help="share of rows in the train split")
    add.add_argument("--split-seed", type=int, default=0, help="seed of the recorded train/test split")
    # the format's own options: only those given reach it, and a format refuses one that is not its own
    add.add_argument("--stratify", default=SUPPRESS, help="column to stratify the split on (tables)")
    images = add.add_argument_group("images (a manifest's columns; the others are the cases' clinical variables)")
    images.add_argument("--image-column", default=SUPPRESS, help="the image file or DICOM series folder (image)")
    images.add_argument("--label-column", default=SUPPRESS, help="a class or value (default: a column named label)")
    images.add_argument("--mask-column", default=SUPPRESS, help="a segmentation file, instead of a label")
    images.add_argument(
        "--patient-column",
        default=SUPPRESS,
        help="the patient id (the split keeps each patient on one side; default: patient_id)",
    )
    images.add_argument(
        "--skip-bad-files",
        action="store_true",
        default=SUPPRESS,
        help="exclude cases whose file is missing or unreadable, counted in the inclusion report (default: refuse)",
    )
    listing = dataset.add_parser("list", help="show registered datasets")
    listing.add_argument("dir", type=Path)
    listing.add_argument("--json", action="store_true")


def _admin_commands(sub: Any) -> None:
    """The site admin's word: requests, approve, reject, audit."""
    requests = sub.add_parser("requests", help="list tasks waiting for this site's approval (with their code)")
    requests.add_argument("dir", type=Path)
    requests.add_argument("--json", action="store_true")
    approve = sub.add_parser("approve", help="approve a pending task's code (covers reruns of the same source)")
    approve.add_argument("dir", type=Path)
    approve.add_argument("hash", help="the code hash `flip-site requests` shows (a unique prefix will do)")
    approve.add_argument("--project", default=None, help="when the same code waits in more than one project")
    reject = sub.add_parser("reject", help="reject a pending task's code; the researcher is shown the reason")
    reject.add_argument("dir", type=Path)
    reject.add_argument("hash")
    reject.add_argument("--reason", required=True)
    reject.add_argument("--project", default=None)
    audit = sub.add_parser("audit", help="the site's audit log").add_subparsers(dest="action", required=True)
    show = audit.add_parser("show", help="print the audit log")
    show.add_argument("dir", type=Path)
    show.add_argument("--last", type=int, default=None, help="only the last N records")
    verify = audit.add_parser("verify", help="check the audit log's hash chain (edited, deleted, reordered records)")
    verify.add_argument("dir", type=Path)
    airlock = sub.add_parser("airlock", help="items researchers asked to be released: review, release, refuse")
    acts = airlock.add_subparsers(dest="action", required=True)
    held = acts.add_parser("list", help="the requests waiting for review (--all: every one, with its decision)")
    held.add_argument("dir", type=Path)
    held.add_argument("--all", action="store_true")
    look = acts.add_parser("show", help="one request: who asked, why, the automatic checks and the exact bytes")
    look.add_argument("dir", type=Path)
    look.add_argument("id")
    look.add_argument("--raw", action="store_true", help="only the item's exact bytes (to a file or a viewer)")
    look.add_argument("--out", type=Path, default=None, help="an evaluation report: write its figures here as PNG")
    for verb, said in (("release", "release it: signed with the site's key"), ("refuse", "refuse it (say why)")):
        act = acts.add_parser(verb, help=said)
        act.add_argument("dir", type=Path)
        act.add_argument("id")
        act.add_argument("--reason", required=verb == "refuse", default="", help="told to the researcher")
        act.add_argument("--as", dest="checker", default=None, help="who decides (default: your login)")
    disclosure = sub.add_parser("disclosure", help="what the site's queries released").add_subparsers(
        dest="action", required=True
    )
    told = disclosure.add_parser("report", help="per project and dataset: what was told, refused and withheld")
    told.add_argument("dir", type=Path)
    told.add_argument("--project", default=None, help="only this project")


def _federation_commands(sub: Any) -> None:
    """Joining and serving: keygen, join, doctor, start."""
    keygen = sub.add_parser("keygen", help="make this site's key pair (send the .pub file to the hub operator)")
    keygen.add_argument("dir", type=Path)
    keygen.add_argument("--force", action="store_true", help="replace the existing key (it must be registered again)")
    join = sub.add_parser("join", help="record the federation this site joins (what the hub operator sent)")
    join.add_argument("dir", type=Path)
    join.add_argument("--fleet", required=True, help="HOST:PORT of the hub's fleet address")
    join.add_argument("--ca", required=True, type=Path, help="the consortium's CA certificate (ca.pem)")
    join.add_argument("--token", required=True, help="this site's token, from `flip site register`")

    doctor = sub.add_parser("doctor", help="check this host and site before going live: what protects task code")
    doctor.add_argument("dir", type=Path)

    start = sub.add_parser("start", help="join a federation and serve tasks")
    start.add_argument("dir", type=Path)
    start.add_argument(
        "--superlink",
        default=None,
        help="HOST:PORT of the hub's fleet address (default: flip-site join's, else the local federation's)",
    )
    start.add_argument(
        "--coordinator", default=None, help="URL of the coordinator's site routes (default: https://the fleet address)"
    )
    start.add_argument("--token", default=None, help="this site's token (default: flip-site join's)")
    start.add_argument("--ca", type=Path, default=None, help="the consortium's CA certificate")
    start.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP, no node authentication: for debugging only, never with patient data",
    )
    start.add_argument(
        "--warm-seconds",
        type=float,
        default=None,
        help="keep a spare task process (torch loaded, ~300 MB) this long after start or the last "
        "step, so that a new run starts at once (default: 900; 0: never)",
    )
    start.add_argument(
        "--device",
        default="auto",
        help="where tasks run: auto (the first GPU if the host has one, else the CPU), cpu, cuda or cuda:N; "
        "the site's choice, over the researcher's (default: auto)",
    )
    start.add_argument(
        "--keep-scratch",
        action="store_true",
        help="keep each run's scratch folder (scratch/run-ID) after the run ends, to debug a task; "
        "by default it is removed",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (CatalogError, PolicyError, ApprovalError, AuditError, CertError, AirlockError) as exc:
        print(f"flip-site: {exc}", file=sys.stderr)
        return SiteExit.REFUSED


def _init(args: argparse.Namespace) -> int:
    site = init_site(args.dir, args.name)
    print(f"site {site.name!r} created in {site.root}")
    return SiteExit.OK


def _dataset(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list_datasets(args)
    options = {key: getattr(args, key) for key in FORMAT_OPTIONS if hasattr(args, key)}  # only those given
    site = add_dataset(
        load_site(args.dir),
        args.name,
        args.path,
        args.format,
        train_fraction=args.train_fraction,
        split_seed=args.split_seed,
        **options,
    )
    entry = site.datasets[args.name]
    if entry.inclusion is None:
        print(
            f"dataset {entry.name!r}: {entry.rows} rows ({entry.train_rows} train / {entry.test_rows} test), "
            f"{len(entry.columns)} columns, {entry.fingerprint[:19]}…"
        )
        return SiteExit.OK
    report = entry.inclusion
    print(
        f"dataset {entry.name!r}: {report.get('cases')} cases in the manifest, {entry.rows} included "
        f"({entry.train_rows} train / {entry.test_rows} test, {report.get('patients')} patients), "
        f"{entry.fingerprint[:19]}…"
    )
    for reason, count in sorted((report.get("excluded") or {}).items()):
        print(f"  excluded: {count} ({reason})")
    if report.get("patients_with_several_cases"):
        print(f"  {report['patients_with_several_cases']} patients have more than one case (kept on one side)")
    return SiteExit.OK


def _list_datasets(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    if args.json:
        print(json.dumps([d.summary() for d in site.datasets.values()], indent=2))
    else:
        for d in site.datasets.values():
            print(f"{d.name}\t{d.format}\t{d.rows} rows\t{d.fingerprint[:19]}…")
    return SiteExit.OK


def _keygen(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    keys = make_site_keys(args.dir / KEYS, site.name, force=args.force)
    print(f"{site.name}'s key pair: {keys.private} (stays here) and {keys.public} ({fingerprint(keys.public)})")
    print(f"send {keys.public} to the hub operator, who runs: flip site register {site.name} {keys.public.name}")
    return SiteExit.OK


def _doctor(args: argparse.Namespace) -> int:
    """Each protection a task process gets on this host, and the site's own readiness; 1 if one is missing
    that the agent would refuse to run tasks without."""
    from site_agent.governance.gate import Governance
    from site_agent.sandbox import isolation

    site = load_site(args.dir)
    Governance(site)  # the policy parses (a PolicyError says where it does not)
    found = isolation.protections()
    for p in found:
        print(f"  {'ok ' if p.holds else 'NO '} {p.name:<8} {p.what}")
    keys = args.dir / KEYS / f"{site.name}.key"
    joined = (args.dir / JOINED).exists()
    print(f"  {'ok ' if keys.exists() else 'NO '} {'keys':<8} this site's key pair ({keys})")
    print(f"  {'ok ' if joined else 'NO '} {'joined':<8} flip-site join has recorded the federation")
    for entry in (d for d in site.datasets.values() if d.format == OMOP.name):  # each database it reads
        for ok, said in omop_checks(Source.read(Path(entry.path))):
            print(f"  {'ok ' if ok else 'NO '} {entry.name[:8]:<8} {said}")
    held = {p.name: p.holds for p in found}
    refused = (not (held["sandbox"] and held["seccomp"]) and not isolation.sandbox_allowed()) or (
        not held["files"] and not isolation.files_allowed()
    )
    print(
        f"{site.name}: {len(site.datasets)} dataset(s); task processes "
        + ("would be refused here (see the NO lines above)" if refused else "can run here")
    )
    return SiteExit.PROBLEMS if refused else SiteExit.OK


def _requests(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    waiting = ApprovalStore(site.root).pending()
    if args.json:
        print(json.dumps(waiting, indent=2))
        return SiteExit.OK
    if not waiting:
        print(f"no task is waiting for approval at {site.name}")
    for request in waiting:
        print(
            f"{request['hash']}\n  project {request['project']}, researcher {request['researcher']}, "
            f"dataset {request['dataset']}, first asked {request['requested']} (run {request['run_id']})"
        )
        print("  " + "\n  ".join(request["source"].rstrip("\n").split("\n")) + "\n")
        if "covariates" in request:  # the table it asks of the database, approved with the code
            print("  covariates " + json.dumps(request["covariates"], sort_keys=True) + "\n")
    return SiteExit.OK


def _answer(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    state = APPROVED if args.command == "approve" else REJECTED
    record = ApprovalStore(site.root).answer(
        args.hash, state, reason=getattr(args, "reason", "") or "", project=args.project
    )
    fields = {("code_hash" if k == "hash" else k): v for k, v in record.items()}
    AuditLog(site.root).append("approval", answer=state, **fields)
    print(
        f"{state} {record['hash']} for project {record['project']} at {site.name}"
        + (f" (reason: {record['reason']})" if state == REJECTED else "")
    )
    return SiteExit.OK


def _airlock(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    airlock = Airlock(site.root, site.name, AuditLog(site.root))
    if args.action == "list":
        held = airlock.held(None if args.all else ReleaseState.PENDING)
        if not held:
            print(f"no request is waiting for review at {site.name}" if not args.all else "no request yet")
        for h in held:
            failed = h.failed_checks()
            print(
                f"{h.request_id}  {h.state:<8}  {h.item:<9}  {h.researcher} ({h.project}), {_when(h.asked_at)}, "
                f"{h.size} bytes, " + (f"checks failed: {', '.join(failed)}" if failed else "all checks passed")
            )
            print(f"    purpose: {visible(h.purpose)}")
        return SiteExit.OK
    if args.action == "show":
        h = airlock.get(args.id)
        content = airlock.content(args.id) if h.state != ReleaseState.REFUSED else b""
        if args.raw:
            sys.stdout.buffer.write(content)
            return SiteExit.OK
        print(f"request {h.request_id} at {site.name}: {h.state}" + (f" ({h.reason})" if h.reason else ""))
        print(f"  asked by {h.researcher}, project {h.project}, {_when(h.asked_at)}: a {h.item} ({h.media_type})")
        print(f"  purpose: {visible(h.purpose)}\n  of: {visible(json.dumps(h.about))}\n  {h.sha256}, {h.size} bytes")
        print("\nautomatic checks:\n  " + summary([Check(**c) for c in h.checks]).replace("\n", "\n  "))
        print(f"\n----- the exact bytes that would leave ({len(content)}) -----")
        sys.stdout.write(visible(h.readable(content, args.out)))  # control characters written out
        print("\n----- end -----")
        return SiteExit.OK
    key = site.root / KEYS / f"{site.name}.key"
    private = load_site_keys(key)[0] if args.action == "release" and key.exists() else None
    checker = args.checker or getpass.getuser()
    h = airlock.decide(args.id, release=args.action == "release", checker=checker, reason=args.reason, key=private)
    print(f"{h.state} {h.request_id} ({h.item} for {h.researcher}, project {h.project}) by {checker}")
    return SiteExit.OK


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp))


def _audit(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    if args.action == "show":
        for line in audit_show(site.root, args.last):
            print(line)
        return SiteExit.OK
    problems = audit_verify(site.root)
    for problem in problems:
        print(problem)
    count = len(read_records(site.root)) if not problems else None
    print(
        f"audit log of {site.name}: "
        + (f"intact ({count} records)" if not problems else f"{len(problems)} problem(s) found")
    )
    return SiteExit.OK if not problems else SiteExit.PROBLEMS


def _disclosure(args: argparse.Namespace) -> int:
    """``flip-site disclosure report``: what the site's queries told each project (``site_agent.queries.report``)."""
    from site_agent.queries.report import lines, report

    site = load_site(args.dir)
    for line in lines(site.name, report(read_records(site.root), args.project)):
        print(line)
    return SiteExit.OK


def _join(args: argparse.Namespace) -> int:
    site = load_site(args.dir)
    keys = args.dir / KEYS
    if not (keys / f"{site.name}.key").exists():
        print(f"flip-site: {site.name} has no key pair yet: run `flip-site keygen {args.dir}` first", file=sys.stderr)
        return SiteExit.REFUSED
    shutil.copyfile(args.ca, keys / "ca.pem")
    path = args.dir / JOINED
    path.write_text(
        json.dumps({"fleet": args.fleet, "coordinator": f"https://{args.fleet}", "token": args.token}, indent=2)
    )
    path.chmod(0o600)
    print(f"{site.name} joins the federation at {args.fleet}; start it with: flip-site start {args.dir}")
    return SiteExit.OK


def _start(args: argparse.Namespace) -> int:
    from flip_core.paths import read_connection
    from site_agent.agent import WARM_SECONDS, SiteAgent
    from site_agent.tasks.devices import ENV_DEVICE, DeviceError
    from site_agent.tasks.devices import resolve as resolve_device

    site = load_site(args.dir)
    joined = json.loads((args.dir / JOINED).read_text()) if (args.dir / JOINED).exists() else {}
    local = {} if joined else read_connection() or {}  # a local federation's own sites
    superlink = args.superlink or joined.get("fleet") or local.get("superlink")
    coordinator = args.coordinator or joined.get("coordinator") or local.get("coordinator_url")
    token = args.token or joined.get("token") or local.get("site_token")
    missing = [
        flag
        for flag, value in (("--superlink", superlink), ("--coordinator", coordinator), ("--token", token))
        if not value
    ]
    if missing:
        print(
            f"flip-site: this site has joined no federation (flip-site join); give {', '.join(missing)}",
            file=sys.stderr,
        )
        return SiteExit.REFUSED
    ca = args.ca or (args.dir / KEYS / "ca.pem" if joined else None)
    key = args.dir / KEYS / f"{site.name}.key"
    if args.insecure:
        print(
            "flip-site: WARNING --insecure: plain HTTP to the hub and no node authentication; anyone on the "
            "network can read this site's traffic. For debugging only, never with patient data.",
            file=sys.stderr,
        )
        ca = key = None
    elif ca is None or not key.exists():
        print(
            f"flip-site: {site.name} needs "
            + (
                f"its key pair (flip-site keygen {args.dir})"
                if not key.exists()
                else "the consortium's CA certificate (--ca or flip-site join)"
            )
            + "; --insecure only for debugging",
            file=sys.stderr,
        )
        return SiteExit.REFUSED
    try:
        device = resolve_device(args.device)
    except DeviceError as exc:
        print(f"flip-site: {exc}", file=sys.stderr)
        return SiteExit.REFUSED
    os.environ[ENV_DEVICE] = device  # handed to the task processes (FLIP_TASK_*)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {site.name} %(levelname)s %(message)s")
    warm = WARM_SECONDS if args.warm_seconds is None else args.warm_seconds
    agent = SiteAgent(
        site,
        str(superlink),
        str(coordinator),
        str(token),
        warm_seconds=warm,
        ca=ca,
        key=key,
        keep_scratch=args.keep_scratch,
        device=device,
    )
    return agent.run()


_COMMANDS = {
    "init": _init,
    "dataset": _dataset,
    "requests": _requests,
    "approve": _answer,
    "reject": _answer,
    "audit": _audit,
    "airlock": _airlock,
    "disclosure": _disclosure,
    "keygen": _keygen,
    "join": _join,
    "start": _start,
    "doctor": _doctor,
}


if __name__ == "__main__":
    sys.exit(main())
