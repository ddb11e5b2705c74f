"""The local federation's hospitals: the four sites of the UCI Heart Disease study, each a site
folder holding only its own hospital's file, under a development policy.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flip_core.paths import data_dir
from flip_local.errors import SitesError
from site_agent.data.catalog import CatalogError, init_site, write_policy
from site_agent.data.formats import add_dataset
from site_agent.data.image_datasets import add_image_dataset
from site_agent.governance.policy import DEFAULT_COUNT_NOISE, DEFAULT_THRESHOLD

HEART_SITES = {
    "Cleveland": "processed.cleveland.data",
    "Hungary": "processed.hungarian.data",
    "Switzerland": "processed.switzerland.data",
    "VA": "processed.va.data",
}
# FLamby's Fed-Heart-Disease split: 66 % train, seed 43, stratified on the label.
HEART_SPLIT = {"train_fraction": 0.66, "split_seed": 43}
DEFAULT_PROJECT = "default"


def heart_site_names(count: int = len(HEART_SITES)) -> list[str]:
    """The four hospitals, then numbered copies of them (``Cleveland-2`` …) for scale tests."""
    hospitals = list(HEART_SITES)
    return [
        hospitals[i % len(hospitals)] + (f"-{i // len(hospitals) + 1}" if i >= len(hospitals) else "")
        for i in range(count)
    ]


def local_policy(auto_approve: bool = True, project: str = DEFAULT_PROJECT) -> dict[str, Any]:
    """The local federation's site policy: ``project`` approved for anyone on any dataset, for
    training and queries, the disclosure threshold and the counts' noise at their defaults, and code auto-approved
    (development) unless ``auto_approve`` is False, when each site's admin must approve it (`flip-site approve`)."""
    return {
        "policy": {"disclosure_threshold": DEFAULT_THRESHOLD, "count_noise": DEFAULT_COUNT_NOISE},
        "projects": {
            project: {
                "approved": True,
                "researchers": ["*"],
                "datasets": ["*"],
                "tasks": ["train", "query"],
                "auto_approve": auto_approve,
            }
        },
    }


def prepare_heart_sites(
    root: Path,
    source: Path | None = None,
    count: int = len(HEART_SITES),
    *,
    auto_approve: bool = True,
    policy: dict[str, Any] | None = None,
    project: str = DEFAULT_PROJECT,
) -> list[Path]:
    """One site directory per hospital, each holding only its own file as ``heart-disease``,
    under the local federation's policy (:func:`local_policy`) or ``policy`` (site.toml's tables).

    With ``count`` above four, further sites hold copies of the hospitals' files in turn
    (a machine-local scale test, not a real federation)."""
    source = source or data_dir() / "heart-disease"
    missing = [f for f in HEART_SITES.values() if not (source / f).is_file()]
    if missing:
        raise SitesError(
            f"the heart-disease files are not in {source} (missing {', '.join(missing)}); "
            "set FLIP_DATA_DIR or run `flip data fetch heart-disease`"
        )
    dirs = []
    for name in heart_site_names(count):
        filename = HEART_SITES[name.split("-")[0]]
        site_dir = root / "sites" / name
        if site_dir.exists():
            shutil.rmtree(site_dir)
        site = init_site(site_dir, name)
        site = add_dataset(site, "heart-disease", source / filename, "uci-heart", **HEART_SPLIT)  # type: ignore[arg-type]
        write_policy(site, policy or local_policy(auto_approve, project))
        dirs.append(site_dir)
    return dirs


def prepare_imaging_demo_sites(
    root: Path,
    source: Path | None = None,
    *,
    auto_approve: bool = True,
    policy: dict[str, Any] | None = None,
    project: str = DEFAULT_PROJECT,
) -> list[Path]:
    """The imaging demo's three sites: each holds its share of BreastMNIST's public images (a seeded non-IID
    split, :mod:`flip_local.imaging_demo`) as PNG files under a manifest, registered as the imaging dataset
    ``breastmnist`` (split by patient, seeded), under the local federation's policy or ``policy``.
    ``source``: BreastMNIST's ``.npz`` or the folder holding it (default: the data folder's ``breastmnist``)."""
    from flip_local.imaging_demo import IMAGING_DATASET, prepare_imaging_sites

    manifests = prepare_imaging_sites(root, source)
    dirs = []
    for name, manifest in manifests.items():
        site_dir = root / "sites" / name
        if site_dir.exists():
            shutil.rmtree(site_dir)
        site = init_site(site_dir, name)
        try:
            site = add_image_dataset(
                site, IMAGING_DATASET, manifest, label_column="label", train_fraction=0.8, split_seed=IMAGING_SPLIT_SEED
            )
        except CatalogError as exc:
            raise SitesError(f"the imaging demo's site {name} could not register its images: {exc}") from None
        write_policy(site, policy or local_policy(auto_approve, project))
        dirs.append(site_dir)
    return dirs


OMOP_DATASET = "gibleed"


def prepare_omop_sites(
    root: Path,
    server: Any,
    *,
    auto_approve: bool = True,
    policy: dict[str, Any] | None = None,
    project: str = DEFAULT_PROJECT,
) -> list[Path]:
    """The OMOP demo's three hospitals: each a database of its own on ``server`` (the federation's PostgreSQL,
    ``flip_local.postgres``) holding its share of OHDSI's Eunomia GiBleed persons (``flip_local.eunomia``), read by a
    role that can only read, registered as the ``omop`` dataset ``gibleed`` (split by person), under the local
    federation's policy or ``policy``."""
    from flip_local.eunomia import POOLED, POOLED_SOURCE, load

    dirs = []
    for database in load(server, root / "omop-secrets"):
        site_dir = root / "sites" / database.site
        if site_dir.exists():
            shutil.rmtree(site_dir)
        site = init_site(site_dir, database.site)
        source = database.write_source(server, site_dir / "omop-source.toml")
        try:
            site = add_dataset(site, OMOP_DATASET, source, "omop")
        except CatalogError as exc:
            raise SitesError(f"the OMOP demo's site {database.site} could not register its database: {exc}") from None
        write_policy(site, policy or local_policy(auto_approve, project))
        dirs.append(site_dir)
    # the whole of Eunomia in one database no site holds: public data, for a notebook's pooled reference fit
    (pooled,) = load(server, root / "omop-secrets", sites=(POOLED,))
    pooled.write_source(server, root / POOLED_SOURCE)
    return dirs


IMAGING_SPLIT_SEED = 7  # each demo site's 80/20 split of its cases, by patient
