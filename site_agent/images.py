"""Image files at a site: what a file holds (shape, spacing, orientation, fingerprint).

An imaging dataset is a manifest (a CSV: one row per case) naming image files, NIfTI, DICOM (one file or a
folder holding one series), PNG or NPZ, with a patient id, a label or a mask, and clinical columns. At
registration every file is read and decoded in full, so that a missing, truncated or corrupt file is found
then, by name, rather than in the middle of a training run (the manifest's check: ``site_agent.manifests``).
Nothing here writes or talks to the network.

numpy, pandas and the readers (nibabel, pydicom, PIL) load inside the functions that use them: this module
is imported in light processes.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip_core.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray

KINDS = ("nifti", "dicom", "dicom-series", "png", "npz")
_KIND_NAMES = {"nifti": "NIfTI", "dicom": "DICOM", "dicom-series": "DICOM series", "png": "PNG", "npz": "NPZ"}
_SUPPORTED = (
    "NIfTI (.nii, .nii.gz), DICOM (.dcm, or a DICOM file without a suffix), a folder holding one DICOM series, "
    "PNG (.png) or NumPy (.npz)"
)
_CHUNK = 1 << 20
_REASON_LENGTH = 200


class ImageError(ConfigError):
    """An image file or a manifest that cannot be used, stated as a sentence naming the file and why."""


@dataclass(frozen=True)
class ImageInfo:
    """What registration measured of one image file (or DICOM series folder).

    ``spacing`` is in mm, one value per spatial axis of ``shape``, in the same order (None: unknown).
    ``orientation`` holds nibabel's axis codes in RAS+ world coordinates: for NIfTI, one per array axis (the
    first three); for DICOM, the directions of the column index, the row index and the slice normal
    (DICOM's own x, y, z order, as ITK and MONAI present a DICOM image), so that a standard axial slice is
    "LPS" -- this is the reverse of ``shape``'s (slices, rows, cols) order."""

    path: str
    kind: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...] | None
    orientation: str | None
    dtype: str
    fingerprint: str
    files: int
    warning: str | None = None
    intensity: dict[str, float] | None = None  # mean, std, p1, p99 of its values (:func:`intensity_summary`)

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "kind": self.kind,
            "shape": list(self.shape),
            "spacing": None if self.spacing is None else list(self.spacing),
            "orientation": self.orientation,
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
            "files": self.files,
            "warning": self.warning,
            "intensity": self.intensity,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ImageInfo:
        spacing = d.get("spacing")
        return cls(
            path=str(d["path"]),
            kind=str(d["kind"]),
            shape=tuple(int(n) for n in d["shape"]),
            spacing=None if spacing is None else tuple(float(s) for s in spacing),
            orientation=d.get("orientation"),
            dtype=str(d["dtype"]),
            fingerprint=str(d["fingerprint"]),
            files=int(d["files"]),
            warning=d.get("warning"),
            intensity=d.get("intensity"),
        )


@dataclass(frozen=True)
class Decoded:
    """One kind's reading of a file: the pixel data and what the file says about it."""

    array: NDArray[Any]
    spacing: tuple[float, ...] | None
    orientation: str | None
    files: int = 1
    warning: str | None = None


# ---- kinds and fingerprints ----


def image_kind(path: Path) -> str:
    """The kind of image file ``path`` is, by its name (a folder: a DICOM series; no suffix: DICOM if it is one)."""
    path = Path(path)
    if path.is_dir():
        return "dicom-series"
    if not path.exists():
        raise ImageError(f"{path} is missing")
    name = path.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return "nifti"
    suffix = path.suffix.lower()
    if suffix == ".dcm":
        return "dicom"
    if suffix == ".png":
        return "png"
    if suffix == ".npz":
        return "npz"
    if path.is_file() and _has_dicom_header(path):
        return "dicom"  # no suffix, or one that is part of a UID-like name (1.2.840.113619.2.55.3.320)
    raise ImageError(
        f"{path} is not a supported image file (its name says {suffix or 'nothing'!r}): use {_SUPPORTED}; "
        f"the kinds are {', '.join(KINDS)}"
    )


def _has_dicom_header(path: Path) -> bool:
    """Whether the file starts as a DICOM file does (a 128-byte preamble, then "DICM")."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def visible_files(folder: Path) -> list[Path]:
    """The regular, non-hidden files of a folder, in name order (a DICOM series' slices)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


def _sha256_hex(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint_of(path: Path) -> str:
    """``sha256:<hex>`` of the file's bytes; of a folder (a DICOM series): of each visible file's name and hash."""
    path = Path(path)
    try:
        if path.is_dir():
            digest = hashlib.sha256()
            for file in visible_files(path):
                digest.update(f"{file.name}\0{_sha256_hex(file)}\n".encode())
            return "sha256:" + digest.hexdigest()
        return "sha256:" + _sha256_hex(path)
    except FileNotFoundError:
        raise ImageError(f"{path} is missing") from None
    except OSError as exc:
        raise ImageError(f"{path} cannot be read ({reason_of(exc)})") from None


def verify_fingerprint(path: Path, expected: str) -> None:
    """Refuse a file (or series folder) whose bytes are not those it was registered with."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path} is gone")
    try:
        actual = fingerprint_of(path)
    except ImageError:
        if not path.exists():
            raise ImageError(f"{path} is gone") from None
        raise
    if actual != expected:
        raise ImageError(f"{path} changed since it was registered (fingerprint differs)")


# ---- reading ----


def read_image_info(path: Path) -> ImageInfo:
    """Read and fully decode an image file (or DICOM series folder); what it holds.

    ImageError: ``<path> is missing``, or ``<path> is not a readable <KIND> file (<reason>)``."""
    path = Path(path).resolve()
    kind = image_kind(path)
    decoded = _decode(path, kind)
    return ImageInfo(
        path=str(path),
        kind=kind,
        shape=tuple(int(n) for n in decoded.array.shape),
        spacing=decoded.spacing,
        orientation=decoded.orientation,
        dtype=decoded.array.dtype.name,
        fingerprint=fingerprint_of(path),
        files=decoded.files,
        warning=decoded.warning,
        intensity=intensity_summary(decoded.array),
    )


INTENSITY_SAMPLE = 1 << 20  # values the percentiles are taken over (an even stride through a larger image)


def intensity_summary(array: NDArray[Any]) -> dict[str, float] | None:
    """An image's values in four numbers (what queries see of its intensities, per case): mean and standard
    deviation over every value, 1st and 99th percentiles over at most a million of them; None when it has none
    that are finite (or its values are not numbers: an RGB PNG is summarised over all its channels)."""
    import numpy as np

    if array.size == 0 or not np.issubdtype(array.dtype, np.number):
        return None
    values = array.reshape(-1)
    step = max(1, values.size // INTENSITY_SAMPLE)
    sample = values[::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    p1, p99 = np.percentile(sample, [1, 99])
    mean = float(np.mean(values, dtype=np.float64))
    std = float(np.std(values, dtype=np.float64))
    if not (np.isfinite(mean) and np.isfinite(std)):
        mean, std = float(sample.mean()), float(sample.std())
    return {"mean": round(mean, 6), "std": round(std, 6), "p1": round(float(p1), 6), "p99": round(float(p99), 6)}


def load_array(path: Path) -> NDArray[Any]:
    """The decoded pixel data (a DICOM series: its slices stacked along the slice normal, (slices, rows, cols))."""
    path = Path(path).resolve()
    return _decode(path, image_kind(path)).array


def _decode(path: Path, kind: str) -> Decoded:
    from site_agent.dicom import read_dicom, read_series

    readers = {
        "nifti": _read_nifti,
        "dicom": read_dicom,
        "dicom-series": read_series,
        "png": _read_png,
        "npz": _read_npz,
    }
    if not path.exists():
        raise ImageError(f"{path} is missing")
    try:
        return readers[kind](path)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path} is missing") from None
    except Exception as exc:  # a reader's own error, whatever it is: the file cannot be used
        raise unreadable(path, kind, reason_of(exc)) from None


def unreadable(path: Path, kind: str, reason: str) -> ImageError:
    noun = "" if kind == "dicom-series" else " file"
    return ImageError(f"{path} is not a readable {_KIND_NAMES[kind]}{noun} ({reason})")


def reason_of(exc: BaseException) -> str:
    """A reader's error, short: its first line, at most a couple of hundred characters."""
    text = str(exc).strip().splitlines()[0].strip() if str(exc).strip() else ""
    text = text or type(exc).__name__
    return text if len(text) <= _REASON_LENGTH else text[: _REASON_LENGTH - 3] + "..."


def to_mm(value: Any) -> float:
    """A spacing as a plain float (a float32's shortest form: 2.2, not 2.200000047683716)."""
    import numpy as np

    if isinstance(value, np.floating) and value.dtype.itemsize <= 4:
        return float(str(value))
    return float(value)


def _read_nifti(path: Path) -> Decoded:
    import nibabel
    import numpy as np
    from nibabel.spatialimages import SpatialImage

    img = nibabel.load(path, mmap=False)
    if not isinstance(img, SpatialImage):
        raise ImageError(f"{path} is not a readable NIfTI file (nibabel reads it as a {type(img).__name__})")
    array = np.asarray(np.asanyarray(img.dataobj))
    zooms = img.header.get_zooms()[: min(3, array.ndim)]
    return Decoded(array=array, spacing=tuple(to_mm(z) for z in zooms), orientation=axcodes(img.affine))


def axcodes(affine: Any) -> str | None:
    """nibabel's axis codes (RAS+) of an affine's first three columns; None when one is undetermined."""
    from nibabel.orientations import aff2axcodes

    codes = aff2axcodes(affine)  # type: ignore[no-untyped-call]
    return None if any(c is None for c in codes) else "".join(str(c) for c in codes)


def _read_png(path: Path) -> Decoded:
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if img.format != "PNG":
            raise ImageError(f"{path} is not a readable PNG file (it holds a {img.format or 'non-PNG'} image)")
        img.load()
        array = np.asarray(img)
    return Decoded(array=array, spacing=None, orientation=None)


def _read_npz(path: Path) -> Decoded:
    import numpy as np

    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        images = [n for n in names if n != "spacing"]
        if "image" in names:
            name = "image"
        elif len(images) == 1:
            name = images[0]
        elif not images:
            raise ImageError(f"{path} is not a readable NPZ file (it holds no image array)")
        else:
            raise ImageError(
                f"{path} is not a readable NPZ file (it holds several arrays, {', '.join(images)}, "
                "and none is named 'image')"
            )
        array = np.asarray(archive[name])
        spacing_array = np.asarray(archive["spacing"], dtype=float) if "spacing" in names else None
    if array.ndim < 2:
        raise ImageError(f"{path} is not a readable NPZ file (its array {name!r} has {array.ndim} dimensions)")
    spacing = None
    if spacing_array is not None:
        if spacing_array.ndim != 1 or not 0 < spacing_array.size <= array.ndim:
            raise ImageError(
                f"{path} is not a readable NPZ file (its 'spacing' must list at most one value per axis of "
                f"its {array.ndim}-dimensional image, not {spacing_array.shape})"
            )
        if not all(math.isfinite(s) and s > 0 for s in spacing_array.tolist()):
            raise ImageError(f"{path} is not a readable NPZ file (its 'spacing' must hold positive numbers)")
        spacing = tuple(float(s) for s in spacing_array.tolist())
    return Decoded(array=array, spacing=spacing, orientation=None)
