"""Seconds per round of a MONAI 3D UNet on SYNTHETIC volumes: FLIP's federation against the same training without it.

Two sites (``Synth-A``, ``Synth-B``) each hold ``--volumes`` synthetic volumes of ``--size`` voxels a side made by
``monai.data.create_test_image_3d`` (random spheres plus noise, a binary mask of them; no patient data), saved as
NIfTI under a manifest and registered as the imaging dataset ``synth3d`` (a seeded 75/25 split by patient). A
real local federation (``flip_local.federation.up`` over those two site folders, warm) runs ``--rounds`` rounds
of FedAvg of one cell: a 3D UNet (channels 8-16-32-64), Dice loss, Adam, ``--epochs`` local epochs per round
over the site's cached train cases (``data.cached``), and the mean Dice on its test cases. Each round's seconds
come from the run's round events, each site's step seconds from its site events.

Then, with the federation stopped (nothing else of FLIP on the CPU), the same cell runs without FLIP, site after
site, each in a child process of this one set up as a site's task process sets itself up (its own session at the
task processes' nice value, ``torch._dynamo`` loaded, their torch thread count), on that site's own registered
split, with the site's caching (round 1 decodes, later rounds reuse) and device, step for step as a site runs it:
the initial model evaluated first (the federation's prepare step, in no round), then round 1 trains and every
later round evaluates the model it got and trains. Each step is timed.

The federated sites train at the same time (one task process each), the local baseline one after the other;
so a federated round is compared with the SLOWER site's local step (``max`` over sites), and the difference is
the federation's overhead: the hub's exchange of the model, the sites' agents, and the two sites sharing the
machine. The headline is the median over rounds 2..N (round 1 also decodes the volumes); round 1 is printed
on its own.

    python -m bench.imaging [--rounds 3] [--volumes 16] [--size 64] [--epochs 1] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flip_core.cell import seed_everything, step_seed
from flip_core.errors import NotConnected, Rejected, RunFailed
from flip_local.federation import Federation, down, up
from flip_local.sites import local_policy
from flip_magics.client import FlipClient
from site_agent.data.catalog import init_site, load_site, write_policy
from site_agent.data.image_datasets import add_image_dataset, load_cases
from site_agent.governance.policy import DEFAULT_THRESHOLD
from site_agent.tasks.runner import load_cell
from site_agent.tasks.worker import ENV_THREADS, TASK_NICE, _yield_cpu

SITES = ("Synth-A", "Synth-B")
DATASET = "synth3d"
TRAIN_FRACTION = 0.75
SPLIT_SEED = 0
RUN_SEED = 0
GOAL = 0.10  # the goal: federation overhead under 10% of a round
WARM_SECONDS = 180.0

# The researcher's cell: what every site runs, and what the local baseline runs in this process.
CELL = """
import torch
from monai.data import DataLoader
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, ScaleIntensityd

# defined once, at the top level: data.cached() keeps one decoded cache per transform object
transform = Compose(
    [
        LoadImaged(keys=["image", "label"]),
        EnsureChannelFirstd(keys=["image", "label"]),
        ScaleIntensityd(keys="image"),
    ]
)


def build_model():
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=1, channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1
    )


def train(model, data, config):
    device = config["device"]
    model.to(device).train()
    loader = DataLoader(data.cached("train", transform), batch_size=2, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = DiceLoss(sigmoid=True)
    total, steps = 0.0, 0
    for _ in range(int(config.get("epochs", 1))):
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].float().to(device))
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
    model.to("cpu")
    return {"loss": total / max(steps, 1)}


def evaluate(model, data, config):
    device = config["device"]
    model.to(device).eval()
    metric = DiceMetric(include_background=True, reduction="mean")
    with torch.no_grad():
        for batch in DataLoader(data.cached("test", transform), batch_size=1):
            predicted = (torch.sigmoid(model(batch["image"].to(device))) > 0.5).float()
            metric(y_pred=predicted, y=batch["label"].float().to(device))
    dice = metric.aggregate().item()
    model.to("cpu")
    return {"dice": dice}
"""


# -- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import torch

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    if torch.cuda.is_available():
        device = f"GPU {torch.cuda.get_device_name(0)} (cuda:0; the sites choose --device auto)"
    else:
        device = "no GPU: CPU only"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}; {device}"
    )


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# -- the synthetic sites -------------------------------------------------------------------------


def make_volumes(folder: Path, count: int, size: int, seed: int) -> Path:
    """``count`` synthetic volumes (image and binary mask, NIfTI) and their manifest (``image,mask,patient_id``)."""
    import nibabel as nib
    import numpy as np
    from monai.data.synthetic import create_test_image_3d

    folder.mkdir(parents=True)
    rad_min = max(2, size // 16)
    rad_max = max(rad_min + 1, size // 5)
    rows = []
    for i in range(count):
        image, mask = create_test_image_3d(
            size,
            size,
            size,
            num_objs=6,
            rad_max=rad_max,
            rad_min=rad_min,
            noise_max=0.5,
            num_seg_classes=1,
            channel_dim=None,
            random_state=np.random.RandomState(seed + i),
        )
        image_path, mask_path = folder / f"vol{i:03d}_image.nii.gz", folder / f"vol{i:03d}_mask.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.eye(4)), image_path)  # type: ignore[no-untyped-call]
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)), mask_path)  # type: ignore[no-untyped-call]
        rows.append({"image": str(image_path), "mask": str(mask_path), "patient_id": f"synth-{seed + i}"})
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def make_sites(root: Path, volumes: int, size: int) -> list[Path]:
    """The two site folders, each with its synthetic volumes registered as ``synth3d``, under the local policy."""
    dirs = []
    for n, name in enumerate(SITES):
        manifest = make_volumes(root / "data" / name, volumes, size, seed=10_000 * (n + 1))
        site_dir = root / "sites" / name
        site = init_site(site_dir, name)
        site = add_image_dataset(
            site, DATASET, manifest, mask_column="mask", train_fraction=TRAIN_FRACTION, split_seed=SPLIT_SEED
        )
        write_policy(site, local_policy())
        dirs.append(site_dir)
    return dirs


# -- the federated run ---------------------------------------------------------------------------


def federated_run(home: Path, site_dirs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """``args.rounds`` rounds of FedAvg over the two sites: each round's seconds, each site's step seconds by round,
    the sites' device and the task processes' thread setting."""
    previous = os.environ.get("FLIP_HOME")
    os.environ["FLIP_HOME"] = str(home)
    try:
        connection = up(home, site_dirs=tuple(site_dirs), warm=True)
        state = Federation(home).state() or {}
        site_env: dict[str, str] = next(
            (p.get("env", {}) for p in state.get("processes", []) if p["name"].startswith("site-")), {}
        )
        threads = site_env.get(ENV_THREADS) or os.environ.get(ENV_THREADS) or ""
        client = FlipClient(connection["coordinator_url"], connection["token"], timeout=600)
        warm_started = time.monotonic()
        while not all(s.get("warm") for s in client.sites()):
            if time.monotonic() - warm_started > WARM_SECONDS:
                raise RuntimeError(f"the sites' spare task processes were not ready within {WARM_SECONDS:.0f} s")
            time.sleep(0.2)
        warm_after = time.monotonic() - warm_started
        load_before = load_average()
        started = time.monotonic()
        handle = client.train(
            CELL, dataset=DATASET, rounds=args.rounds, seed=RUN_SEED, name="unet3d", config={"epochs": args.epochs}
        )
        handle.wait(args.timeout)
        wall = time.monotonic() - started
        events = list(handle.events)
    finally:
        down(home)
        if previous is None:
            os.environ.pop("FLIP_HOME", None)
        else:
            os.environ["FLIP_HOME"] = previous
    rounds: dict[int, float] = {}
    steps: dict[int, dict[str, float]] = {}
    devices: set[str] = set()
    dice: dict[int, float] = {}
    for event in events:
        kind = event.get("type")
        if kind == "site" and event.get("status") == "done" and "seconds" in event:
            r = int(event["round"])
            if r not in rounds:  # the final evaluate-only exchange reports its sites with the last round's number
                steps.setdefault(r, {})[str(event["site"])] = float(event["seconds"])
            if event.get("device"):
                devices.add(str(event["device"]))
        elif kind == "round":
            rounds[int(event["round"])] = float(event["seconds"])
        elif kind == "metrics" and event.get("site") == "global" and event.get("phase") == "evaluate":
            value = event.get("metrics", {}).get("dice")
            if value is not None:
                dice[int(event["round"])] = float(value)
    return {
        "rounds": rounds,
        "steps": steps,
        "devices": sorted(devices),
        "threads": threads,
        "startup": float(connection["started_seconds"]),
        "warm_after": warm_after,
        "wall": wall,
        "dice": dice,
        "load": load_before,
    }


# -- the local baseline --------------------------------------------------------------------------


class LocalData:
    """Stands in for the site's ``TaskData`` (``site_agent.tasks.runner``) outside the federation: the site's train and
    test cases, its device, and ``cached(part, transform)``, one ``monai.data.CacheDataset`` per part kept while
    its transform is the one asked for, as a site's warm task process keeps it across a run's rounds."""

    def __init__(self, train: list[dict[str, Any]], test: list[dict[str, Any]], device: str) -> None:
        self.train = train
        self.test = test
        self.device = device
        self._held: dict[str, tuple[Any, Any]] = {}

    def cached(self, part: str, transform: Any = None) -> Any:
        from monai.data.dataset import CacheDataset

        held = self._held.get(part)
        if held is None or held[0] is not transform:
            cases = [dict(c) for c in (self.train if part == "train" else self.test)]
            held = self._held[part] = (
                transform,
                CacheDataset(data=cases, transform=transform, cache_rate=1.0, num_workers=0, progress=False),
            )
        return held[1]


def site_steps(site_dir: Path, rounds: int, epochs: int, device: str) -> list[float]:
    """The seconds of each round's step at one site, run here as the site runs it (no federation): the cell
    loaded once in a fresh namespace (as a site's task process loads it), the initial model evaluated first
    (untimed: the federation's prepare step is in no round), then round 1 trains and each later round evaluates
    the model it got and trains. The site carries its own model from round to round (no averaging; the compute is
    the same). Each step is seeded as a site seeds it."""
    import torch

    from flip_magics.task import prepare

    initial = prepare(CELL, seed=RUN_SEED).initial  # the same initial model the federated run starts from
    config = {"epochs": epochs, "device": device}
    site = load_site(site_dir)
    train_cases, test_cases = load_cases(site, DATASET)
    namespace = load_cell(CELL)
    data = LocalData(train_cases, test_cases, device)
    state = {k: torch.from_numpy(v.copy()) for k, v in initial.items()}
    seed_everything(step_seed(RUN_SEED, 0, site.name))
    model = namespace["build_model"]()
    model.load_state_dict(state)
    namespace["evaluate"](model, data, config)  # the prepare step (round 0): decodes the test cases
    times = []
    for round_ in range(1, rounds + 1):
        started = time.monotonic()
        seed_everything(step_seed(RUN_SEED, round_, site.name))
        model = namespace["build_model"]()
        model.load_state_dict(state)
        if round_ > 1:
            namespace["evaluate"](model, data, config)
        namespace["train"](model, data, config)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        times.append(time.monotonic() - started)
    return times


def baseline_process(site_dir: str, rounds: int, epochs: int, device: str, threads: int) -> list[float]:
    """:func:`site_steps` in a child process set up as a site's task process is (``site_agent.tasks.worker``): its own
    session at nice TASK_NICE (the same share of the CPU against anything else running), ``torch._dynamo`` imported
    before the first step, and the task processes' torch thread count (0: torch's default)."""
    _yield_cpu()
    import torch
    import torch._dynamo  # noqa: F401 - the task process imports it before its first step, not in round 1

    if threads:
        torch.set_num_threads(threads)
    return site_steps(Path(site_dir), rounds, epochs, device)


def local_baseline(
    site_dirs: list[Path], rounds: int, epochs: int, device: str, threads: int
) -> dict[str, list[float]]:
    """Each site's step seconds by round, the sites one after the other, each in a fresh child process."""
    context = multiprocessing.get_context("spawn")  # a clean process (and the one CUDA takes)
    out = {}
    for site_dir in site_dirs:
        with context.Pool(1) as pool:
            out[load_site(site_dir).name] = pool.apply(
                baseline_process, (str(site_dir), rounds, epochs, device, threads)
            )
    return out


# -- the report ----------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def report(args: argparse.Namespace, fed: dict[str, Any], local: dict[str, list[float]], extra: dict[str, Any]) -> None:
    import torch

    names = list(local)
    rounds = sorted(fed["rounds"])
    print(f"machine: {machine_line()}")
    splits = ", ".join(f"{n} {extra['splits'][n][0]}/{extra['splits'][n][1]}" for n in names)
    print(
        f"data: SYNTHETIC volumes (monai.data.create_test_image_3d: random spheres, noise, their binary mask), "
        f"not patient data; {len(names)} sites x {args.volumes} volumes of {args.size}^3 voxels "
        f"(train/test volumes: {splits})"
    )
    print(
        f"model: MONAI 3D UNet (8-16-32-64, 1 residual unit), Dice loss, Adam, batch 2, {args.epochs} local "
        f"epoch(s) per round, mean Dice on the test cases; FedAvg, {args.rounds} rounds"
    )
    threads = fed["threads"] or f"torch's default ({extra['default_threads']})"
    print(
        f"device: sites {', '.join(fed['devices']) or '?'}, local baseline {extra['device']}; torch threads: "
        f"{threads} per task process ({ENV_THREADS}, as the local federation sets it), the same in the baseline; "
        f"the baseline runs each site in a child process set up as a task process (own session, nice {TASK_NICE})"
    )
    print(
        f"federation: cold start {fed['startup']:.1f} s, spare task processes warm {fed['warm_after']:.1f} s later; "
        f"run submitted to completed {fed['wall']:.1f} s (prepare, rounds, final evaluation); "
        f"load average before the run {fed['load']}, before the baseline {extra['load']}"
    )
    dice = ", ".join(f"round {r} {v:.3f}" for r, v in sorted(fed["dice"].items()))
    fewest = min(test for _, test in extra["splits"].values())
    withheld = (
        f"none sent: each site has {fewest} test volumes, under its disclosure threshold of {DEFAULT_THRESHOLD}"
        if fewest < DEFAULT_THRESHOLD
        else "none reported"
    )
    print(f"federated mean test Dice (global): {dice or withheld}")
    print()
    print(
        "compared: a federated round (the sites train at the same time, one task process each; from the round "
        "event) against the slower site's local step (max over sites; the baseline runs them one after the other, "
        "after the federation stopped). overhead = federated - local max."
    )
    site_cols = " ".join(f"{'local ' + n:>14}" for n in names)
    header = (
        f"{'round':>5} {'federated s':>11} {'local max s':>11} {site_cols} {'overhead s':>10} {'overhead %':>10} "
        f"{'site step max s':>15}"
    )
    print(header)
    rows = []
    for r in rounds:
        per_site = [local[n][r - 1] for n in names]
        federated, local_max = fed["rounds"][r], max(per_site)
        overhead = federated - local_max
        step_max = max(fed["steps"].get(r, {}).values(), default=float("nan"))
        rows.append((r, federated, local_max, overhead, federated - step_max))
        print(
            f"{r:>5} {federated:>11.2f} {local_max:>11.2f} {' '.join(f'{s:>14.2f}' for s in per_site)} "
            f"{overhead:>10.2f} {100 * overhead / federated:>9.1f}% {step_max:>15.2f}"
        )
    print(
        "  (site step max s: the slower site's own step seconds inside the federation, from its site event; "
        "round minus it is the hub's share alone)"
    )
    print()
    later = [row for row in rows if row[0] >= 2] or rows
    which = "rounds 2.." + str(rounds[-1]) if len(rows) > 1 else "round 1 (the only round)"
    fed_m, local_m, over_m, hub_m = (median([row[i] for row in later]) for i in (1, 2, 3, 4))
    share = over_m / fed_m
    print(
        f"headline, median over {which}: federated {fed_m:.2f} s/round, local {local_m:.2f} s/round (max over "
        f"sites), overhead {over_m:.2f} s = {100 * share:.1f}% of a federated round"
    )
    print(
        f"  of which the hub's share alone (round minus the slower site's own step inside the federation): "
        f"{hub_m:.2f} s = {100 * hub_m / fed_m:.1f}%"
    )
    if len(rows) > 1:
        r1 = rows[0]
        print(
            f"round 1 (decodes the volumes into the cache; the task process's first train() of the cell): "
            f"federated {r1[1]:.2f} s, local {r1[2]:.2f} s, overhead {r1[3]:.2f} s = {100 * r1[3] / r1[1]:.1f}%"
        )
    goal = f"goal: federation overhead under {100 * GOAL:.0f}% of a round -> "
    if over_m < 0:  # the same compute cannot take longer without the federation: something else had the CPU
        print(
            goal + f"INCONCLUSIVE: the overhead came out negative ({over_m:.2f} s), the local baseline slower than "
            f"the federated round; the machine was not quiet (load average before the baseline {extra['load']}); "
            "run again on a quiet machine"
        )
    elif share < GOAL:
        print(goal + f"MET ({100 * share:.1f}%)")
    else:
        print(goal + f"NOT MET ({100 * share:.1f}%; {over_m:.2f} s of overhead on a {fed_m:.2f} s round)")
    if not torch.cuda.is_available():
        print("no GPU on this machine: CPU figures only")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--volumes", type=int, default=16, help="synthetic volumes per site")
    parser.add_argument("--size", type=int, default=64, help="voxels a side of each volume")
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the federated run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (sites, volumes, logs)")
    args = parser.parse_args()
    if args.rounds < 1 or args.volumes < 2 or args.size < 16 or args.size % 8 or args.epochs < 1:
        parser.error(
            "need --rounds >= 1, --volumes >= 2, --size >= 16 and a multiple of 8 (the UNet's three "
            "strides of 2), --epochs >= 1"
        )

    import torch

    default_threads = torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="flip-bench-imaging-"))
    try:
        site_dirs = make_sites(tmp, args.volumes, args.size)
        splits = {}
        for d in site_dirs:
            site = load_site(d)
            entry = site.dataset(DATASET)
            splits[site.name] = (entry.train_rows, entry.test_rows)
            if entry.train_rows < DEFAULT_THRESHOLD:  # site_agent.disclosure.guard would withhold its parameters
                raise SystemExit(
                    f"site {site.name} has {entry.train_rows} train volumes; a site sends no model trained on fewer "
                    f"than {DEFAULT_THRESHOLD} (its disclosure threshold): use more --volumes"
                )
        try:
            fed = federated_run(tmp / "home", site_dirs, args)
        except (RunFailed, Rejected, NotConnected, TimeoutError, RuntimeError) as exc:
            raise SystemExit(
                f"the federated run failed: {type(exc).__name__}: {exc} (--keep keeps {tmp} and its logs)"
            ) from None
        device = fed["devices"][0] if fed["devices"] else ("cuda:0" if torch.cuda.is_available() else "cpu")
        load = load_average()
        local = local_baseline(site_dirs, args.rounds, args.epochs, device, int(fed["threads"] or 0))
        report(
            args,
            fed,
            local,
            {"splits": splits, "device": device, "default_threads": default_threads, "load": load},
        )
    finally:
        if args.keep:
            print(f"kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
