"""The local federation's imaging demo: BreastMNIST's breast-ultrasound images spread over three demo sites.

BreastMNIST (MedMNIST v2, Yang et al. 2023; CC BY 4.0; source images Al-Dhabyani et al. 2020) is one public
dataset with no natural split by hospital, so the demo makes one: the official train and val images (624) are
assigned to :data:`IMAGING_SITES` with a seed, label-skewed (non-IID) the way federated-learning benchmarks do it,
and each site gets a case folder (PNGs and a manifest) that its admin registers as an imaging dataset. The sites
are a split of one dataset, not real hospitals. The official test images (156) go to no site: because the data is
public they can be a hold-out that both the federated model and a central reference (trained on the pooled
images, :func:`public_pool`) are scored on, which a real federation could never do.

Every image keeps an id naming its place in the public file (``bm-train-0012`` is ``train_images[12]``), so
anyone can trace a site's case back to the published data.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from flip_core.paths import data_dir
from flip_local.errors import SitesError

# demo sites: a split of one public dataset, not real hospitals
IMAGING_SITES = ("Ultrasound-A", "Ultrasound-B", "Ultrasound-C")
IMAGING_DATASET = "breastmnist"
SPLIT_SEED = 20261202
# The concentration of the Dirichlet distribution each class's shares of the sites are drawn from (the usual
# label-skew benchmark, Hsu et al. 2019): at 0.8 the sites differ clearly in size and in their share of malignant
# images, yet (with at least MIN_PER_CLASS of each class per site) every site can still train and be scored on
# both classes. Larger values give near-equal, IID-like sites; values near 0 give sites that hold one class.
DIRICHLET_ALPHA = 0.8
# each site's fewest images of one class: below it a site's training and its test split see too few of that class
MIN_PER_CLASS = 20
# redraws of one class's proportions before the split is given up as impossible for these labels
MAX_DRAWS = 100

SPLITS = ("train", "val", "test")
# the names the file is found under: as MedMNIST's site serves it (`flip data fetch`) and as MedMNIST names it
_FILENAMES = ("breastmnist.npz", "BreastMNIST.npz")
IMAGE_SIZE = (28, 28)
MALIGNANT = 0  # BreastMNIST's label 0; label 1 is normal or benign


def _source_file(source: Path | None) -> Path:
    """The npz to read: ``source`` itself when it names a file, else the first of the known names in ``source``
    (or in the data directory's ``breastmnist`` folder), else the path a missing file is reported under."""
    if source is not None and not source.is_dir():
        return source
    folder = source if source is not None else data_dir() / IMAGING_DATASET
    for name in _FILENAMES:
        if (folder / name).is_file():
            return folder / name
    return folder / _FILENAMES[-1]


def load_breastmnist(source: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BreastMNIST's official splits, ``{"train": (images, labels), "val": …, "test": …}``: images ``(N, 28, 28)``
    uint8, labels raveled to int64 (the official file stores them as ``(N, 1)``).

    ``source`` is the npz or the folder holding it; by default the data directory's ``breastmnist`` folder
    (``$FLIP_DATA_DIR``, where ``flip data fetch breastmnist`` puts it)."""
    path = _source_file(source)
    if not path.is_file():
        raise SitesError(
            f"the BreastMNIST file is not at {path}; set FLIP_DATA_DIR or run `flip data fetch {IMAGING_DATASET}`"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (OSError, ValueError) as exc:
        raise SitesError(f"the BreastMNIST file {path} could not be read as an npz archive ({exc})") from None
    data: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        missing = [key for key in (f"{split}_images", f"{split}_labels") if key not in arrays]
        if missing:
            raise SitesError(f"the BreastMNIST file {path} has no {', '.join(missing)} (is it MedMNIST's npz?)")
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].ravel().astype(np.int64)
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
            raise SitesError(
                f"the BreastMNIST file {path} holds {split} images of shape {images.shape} ({images.dtype}) and "
                f"{len(labels)} labels; expected (N, height, width) uint8 images, one label each"
            )
        data[split] = (images, labels)
    return data


def _counts(proportions: np.ndarray, total: int) -> np.ndarray:
    """``total`` items cut by ``proportions``: cumulative rounding, so the parts add up to ``total`` exactly."""
    cuts = np.round(np.cumsum(proportions) * total).astype(np.int64)
    cuts[-1] = total
    return np.diff(cuts, prepend=0)


def site_assignment(
    labels: np.ndarray, sites: int = len(IMAGING_SITES), seed: int = SPLIT_SEED, alpha: float = DIRICHLET_ALPHA
) -> np.ndarray:
    """Which site (``0 … sites-1``) holds each image: a label-skewed, non-IID split, deterministic for a seed.

    For each class in turn, its images are shuffled and cut into ``sites`` parts with proportions drawn from
    Dirichlet(``alpha``), so the sites differ in both size and label mix. Each class's proportions are redrawn
    (same generator) until every site gets at least :data:`MIN_PER_CLASS` of that class, so that no site lacks a
    class to learn or be scored on; after :data:`MAX_DRAWS` draws the split is refused. Redrawing per class draws
    from the same distribution as redrawing the whole split, as the classes' proportions are independent."""
    labels = np.asarray(labels).ravel()
    if sites < 1:
        raise SitesError(f"the images must go to at least one site, not {sites}")
    if not alpha > 0:
        raise SitesError(f"the Dirichlet concentration must be positive, not {alpha}")
    rng = np.random.default_rng(seed)
    assignment = np.full(len(labels), -1, dtype=np.int64)
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < sites * MIN_PER_CLASS:
            raise SitesError(
                f"class {cls} has {len(members)} images, too few for {sites} sites to get {MIN_PER_CLASS} each"
            )
        members = rng.permutation(members)
        for _ in range(MAX_DRAWS):
            counts = _counts(rng.dirichlet(np.full(sites, alpha)), len(members))
            if counts.min() >= MIN_PER_CLASS:
                break
        else:
            raise SitesError(
                f"no draw in {MAX_DRAWS} gave every one of {sites} sites {MIN_PER_CLASS} images of class {cls} "
                f"(seed {seed}, alpha {alpha}); raise alpha or use fewer sites"
            )
        assignment[members] = np.repeat(np.arange(sites), counts)
    return assignment


def write_case_folder(folder: Path, images: np.ndarray, labels: np.ndarray, ids: list[str]) -> Path:
    """Write a case folder the site registers as an imaging dataset: ``folder/images/<id>.png`` (8-bit grey,
    lossless, so the pixels are exactly the array's) and ``folder/manifest.csv`` with the columns ``image`` (the
    path relative to the folder), ``label`` and ``patient_id`` (the id: one image per patient in BreastMNIST, so
    the site's split by patient is a split by image). An existing folder is removed first, so no image of an
    earlier split lingers. Returns the manifest's path."""
    labels = np.asarray(labels).ravel()
    if not len(images) == len(labels) == len(ids):
        raise SitesError(f"{len(images)} images, {len(labels)} labels and {len(ids)} ids: one of each per case")
    if len(set(ids)) != len(ids):
        raise SitesError("the case ids repeat; each case needs its own id (it names its file)")
    bad = [i for i in ids if not i or "/" in i or "\\" in i or i.startswith(".")]
    if bad:
        raise SitesError(f"the case ids {', '.join(map(repr, bad[:5]))} cannot name a file")
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "images").mkdir(parents=True)
    rows = []
    for image, label, case in zip(images, labels, ids, strict=True):
        pixels = np.asarray(image)
        if pixels.ndim != 2 or pixels.dtype != np.uint8:
            raise SitesError(f"image {case} is {pixels.shape} {pixels.dtype}; a case is one 2-D uint8 grey image")
        relative = f"images/{case}.png"
        Image.fromarray(np.ascontiguousarray(pixels), mode="L").save(folder / relative, format="PNG")
        rows.append({"image": relative, "label": int(label), "patient_id": case})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows, columns=["image", "label", "patient_id"]).to_csv(manifest, index=False)
    return manifest


def _pool(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The official train and val images as one pool (train first), with the ids that trace them."""
    images = np.concatenate([data["train"][0], data["val"][0]])
    labels = np.concatenate([data["train"][1], data["val"][1]])
    ids = [f"bm-{split}-{i:04d}" for split in ("train", "val") for i in range(len(data[split][1]))]
    return images, labels, ids


def prepare_imaging_sites(root: Path, source: Path | None = None, *, seed: int = SPLIT_SEED) -> dict[str, Path]:
    """Write each demo site's case folder, ``root/imaging/<site>/``: the official train and val images spread over
    :data:`IMAGING_SITES` by :func:`site_assignment`. The official test images go to no site (they are
    :func:`public_holdout`). Only the files are written; registering them is the site's
    (``site_agent.data.image_datasets.add_image_dataset``). Returns ``{site: manifest path}``."""
    images, labels, ids = _pool(load_breastmnist(source))
    assignment = site_assignment(labels, len(IMAGING_SITES), seed)
    manifests = {}
    for number, site in enumerate(IMAGING_SITES):
        held = np.flatnonzero(assignment == number)
        manifests[site] = write_case_folder(root / "imaging" / site, images[held], labels[held], [ids[i] for i in held])
    return manifests


def public_holdout(root: Path, source: Path | None = None) -> Path:
    """Write the official test images (156) as ``root/imaging/public-test/`` and return its manifest: a hold-out
    no site trained on, to score the federated model and the central reference on alike (possible only because
    this data is public)."""
    images, labels = load_breastmnist(source)["test"]
    ids = [f"bm-test-{i:04d}" for i in range(len(labels))]
    return write_case_folder(root / "imaging" / "public-test", images, labels, ids)


def public_pool(root: Path, source: Path | None = None) -> Path:
    """Write the official train and val images, all the sites' data pooled, as ``root/imaging/public-pool/`` and
    return its manifest: what the central reference trains on, the upper bound the federation is compared with."""
    images, labels, ids = _pool(load_breastmnist(source))
    return write_case_folder(root / "imaging" / "public-pool", images, labels, ids)


def describe_split(assignment: np.ndarray, labels: np.ndarray) -> pd.DataFrame:
    """One row per site (its name, images, malignant, benign or normal, share malignant), to show how uneven the
    split is. Sites beyond :data:`IMAGING_SITES` are named ``site-<number>``."""
    assignment, labels = np.asarray(assignment).ravel(), np.asarray(labels).ravel()
    if len(assignment) != len(labels):
        raise SitesError(f"{len(assignment)} site assignments for {len(labels)} labels; one per image")
    count = int(assignment.max()) + 1 if len(assignment) else 0
    rows = []
    for number in range(count):
        held = labels[assignment == number]
        malignant = int(np.sum(held == MALIGNANT))
        rows.append(
            {
                "site": IMAGING_SITES[number] if number < len(IMAGING_SITES) else f"site-{number}",
                "images": len(held),
                "malignant": malignant,
                "benign_or_normal": len(held) - malignant,
                "share_malignant": malignant / len(held) if len(held) else float("nan"),
            }
        )
    return pd.DataFrame(rows, columns=["site", "images", "malignant", "benign_or_normal", "share_malignant"])


__all__ = [
    "DIRICHLET_ALPHA",
    "IMAGING_DATASET",
    "IMAGING_SITES",
    "MIN_PER_CLASS",
    "SPLIT_SEED",
    "describe_split",
    "load_breastmnist",
    "prepare_imaging_sites",
    "public_holdout",
    "public_pool",
    "site_assignment",
    "write_case_folder",
]
