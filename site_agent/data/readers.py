"""Image readers: each kind of image file a site registers, read by name, each with the package it needs.

A reader decodes one file (or a folder: a DICOM series) in full, into its pixel data and what the file says
of it (:class:`Decoded`). Readers register by name in ``site_agent.data.images`` (``READERS``): NIfTI with
nibabel, DICOM file and DICOM series with pydicom (``site_agent.data.dicom``), PNG with pillow and NPZ with
numpy (here). Their packages are imported where a file is read, never when this module is: a reader whose
package is not installed says so by name (:class:`ReaderUnavailable`) rather than calling the file unreadable.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flip_core.errors import ConfigError

if TYPE_CHECKING:
    from numpy.typing import NDArray

_REASON_LENGTH = 200


class ImageError(ConfigError):
    """An image file or a manifest that cannot be used, stated as a sentence naming the file and why."""


class ReaderUnavailable(ImageError):
    """A reader's package is not installed at this site: no file of its kind can be read here, whatever the file."""


@dataclass(frozen=True)
class Decoded:
    """One kind's reading of a file: the pixel data and what the file says about it."""

    array: NDArray[Any]
    spacing: tuple[float, ...] | None
    orientation: str | None
    files: int = 1
    warning: str | None = None


@dataclass(frozen=True)
class ImageReader:
    """One kind of image file and how it is read: ``name`` (the kind, as an index records it), ``label`` (as a
    sentence names it), the package it needs (``package`` as it is installed, ``module`` as it is imported), the
    file names it reads (``suffixes``, lower case), ``sniff`` (whether a file with none of them is one of its
    kind) and whether it reads a ``folder`` rather than one file."""

    name: str
    label: str
    package: str
    module: str
    read: Callable[[Path], Decoded]
    suffixes: tuple[str, ...] = ()
    sniff: Callable[[Path], bool] | None = None
    folder: bool = False

    @property
    def what(self) -> str:
        """What the reader reads, in a sentence: "NIfTI file", "DICOM series"."""
        return self.label if self.folder else f"{self.label} file"

    def unreadable(self, path: Path, reason: str) -> ImageError:
        return ImageError(f"{path} is not a readable {self.what} ({reason})")

    def require(self) -> None:
        """ReaderUnavailable, naming the package, when the one this reader needs cannot be imported."""
        try:
            importlib.import_module(self.module)
        except ImportError as exc:
            top = self.module.split(".")[0]
            if (exc.name or "").split(".")[0] == top:
                why = "which is not installed"
            else:
                why = f"which cannot be imported here ({reason_of(exc)})"
            raise ReaderUnavailable(f"reading {self.label} needs the package {self.package!r}, {why}") from None

    def decode(self, path: Path) -> Decoded:
        """Read and fully decode ``path`` (ImageError: ``<path> is missing``, ``<path> is not a readable <KIND>
        file (<reason>)``, or the reader's package is not installed)."""
        if not path.exists():
            raise ImageError(f"{path} is missing")
        self.require()
        try:
            return self.read(path)
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError(f"{path} is missing") from None
        except Exception as exc:  # a reader's own error, whatever it is: the file cannot be used
            raise self.unreadable(path, reason_of(exc)) from None


def visible_files(folder: Path) -> list[Path]:
    """The regular, non-hidden files of a folder, in name order (a DICOM series' slices)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")), key=lambda p: p.name)


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


def read_nifti(path: Path) -> Decoded:
    """A NIfTI file (.nii, .nii.gz), with nibabel: its spacing from the header's zooms, its axis codes."""
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


def read_png(path: Path) -> Decoded:
    """A PNG file, with pillow (no spacing, no orientation)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        if img.format != "PNG":
            raise ImageError(f"{path} is not a readable PNG file (it holds a {img.format or 'non-PNG'} image)")
        img.load()
        array = np.asarray(img)
    return Decoded(array=array, spacing=None, orientation=None)


def read_npz(path: Path) -> Decoded:
    """A NumPy archive: its array named ``image`` (or its one array), and its ``spacing`` if it holds one."""
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


NIFTI = ImageReader("nifti", "NIfTI", "nibabel", "nibabel", read_nifti, suffixes=(".nii", ".nii.gz"))
PNG = ImageReader("png", "PNG", "pillow", "PIL", read_png, suffixes=(".png",))
NPZ = ImageReader("npz", "NPZ", "numpy", "numpy", read_npz, suffixes=(".npz",))
