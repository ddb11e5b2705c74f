"""Image files at a site: which reader reads a file, what a file holds (shape, spacing, orientation, fingerprint).

An imaging dataset is a manifest (a CSV: one row per case) naming image files, NIfTI, DICOM (one file or a
folder holding one series), PNG or NPZ, with a patient id, a label or a mask, and clinical columns. At
registration every file is read and decoded in full, so that a missing, truncated or corrupt file is found
then, by name, rather than in the middle of a training run (the manifest's check: ``site_agent.data.manifests``).
Nothing here writes or talks to the network.

Readers register by name in :data:`READERS` (``site_agent.data.readers``, ``site_agent.data.dicom``); a file's
name says which reads it (:func:`image_kind`). numpy, pandas and the readers' packages (nibabel, pydicom, PIL)
load inside the functions that use them: this module is imported in light processes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from site_agent.data.dicom import DICOM, DICOM_SERIES
from site_agent.data.readers import NIFTI, NPZ, PNG, Decoded, ImageError, ImageReader, reason_of, visible_files
from site_agent.data.registry import Registry

if TYPE_CHECKING:
    from numpy.typing import NDArray

READERS: Registry[ImageReader] = Registry("image reader", ImageError)
READERS.register(NIFTI.name, NIFTI)
READERS.register(DICOM.name, DICOM)
READERS.register(DICOM_SERIES.name, DICOM_SERIES)
READERS.register(PNG.name, PNG)
READERS.register(NPZ.name, NPZ)
KINDS = READERS.names()  # the kinds of image file a site reads, as an index records them
_SUPPORTED = (
    "NIfTI (.nii, .nii.gz), DICOM (.dcm, or a DICOM file without a suffix), a folder holding one DICOM series, "
    "PNG (.png) or NumPy (.npz)"
)
_CHUNK = 1 << 20


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


# ---- kinds and fingerprints ----


def image_kind(path: Path) -> str:
    """The kind of image file ``path`` is, by its name (a folder: a DICOM series; no suffix: DICOM if it is one):
    the name of the reader that reads it."""
    path = Path(path)
    if path.is_dir():
        return next(reader.name for reader in READERS if reader.folder)
    if not path.exists():
        raise ImageError(f"{path} is missing")
    name = path.name.lower()
    for reader in READERS:
        if name.endswith(reader.suffixes):
            return reader.name
    if path.is_file():
        for reader in READERS:
            if reader.sniff is not None and reader.sniff(path):
                return reader.name
    suffix = path.suffix.lower()
    raise ImageError(
        f"{path} is not a supported image file (its name says {suffix or 'nothing'!r}): use {_SUPPORTED}; "
        f"the kinds are {', '.join(KINDS)}"
    )


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


def decode(path: Path, reader: str | None = None) -> Decoded:
    """Read and fully decode an image file (or DICOM series folder) with the reader named ``reader`` (the one its
    name says when None). ImageError: an unknown reader (naming the known ones), a file missing or unreadable, or
    a reader whose package is not installed."""
    path = Path(path).resolve()
    return READERS.get(reader or image_kind(path)).decode(path)


def read_image_info(path: Path) -> ImageInfo:
    """Read and fully decode an image file (or DICOM series folder); what it holds.

    ImageError: ``<path> is missing``, or ``<path> is not a readable <KIND> file (<reason>)``."""
    path = Path(path).resolve()
    kind = image_kind(path)
    decoded = READERS.get(kind).decode(path)
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
    return decode(path).array
