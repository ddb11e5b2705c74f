"""The one array codec: named arrays as an ``.npz`` archive, never pickled.

Model parameters travel between the notebook, the hub and the sites in this form, and a task
step is a *frame*: a JSON header and such an archive (``encode_frame``). Loading always passes
``allow_pickle=False``, so nothing executable can travel. :func:`check_model` tells a real model
from bytes that only claim to be one, by reading each array's header (no data is loaded).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from typing import Any

import numpy as np

from flip_core.errors import FlipError

# the dtypes a model's arrays may have: booleans, integers, floats (no objects, strings or voids)
MODEL_DTYPE_KINDS = "biuf"
MAX_ARRAYS = 100_000
_LENGTH = struct.Struct("<Q")


class ModelInvalid(FlipError):
    """Bytes that are not a model: not an ``.npz`` of numeric arrays, or bigger than allowed."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def _member_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str:
    """Why one member of the archive is not a numeric array ("" when it is one)."""
    if not info.filename.endswith(".npy") or info.filename.startswith("/") or ".." in info.filename:
        return f"{info.filename!r} is not an array"
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
        except (ValueError, OSError, SyntaxError) as exc:
            return f"{info.filename!r} is not an array ({exc})"
        offset = member.tell()
    if dtype.kind not in MODEL_DTYPE_KINDS or dtype.hasobject:
        return f"array {info.filename[:-4]!r} has dtype {dtype}, not a number type"
    if offset + math.prod(shape) * dtype.itemsize != info.file_size:
        return f"array {info.filename[:-4]!r} is truncated or padded"
    return ""


def check_model(blob: bytes, max_bytes: int | None = None) -> int:
    """Raise :class:`ModelInvalid` with a sentence unless ``blob`` is a model; its number of arrays."""
    if max_bytes is not None and len(blob) > max_bytes:
        raise ModelInvalid(f"the model is {len(blob)} bytes, more than the {max_bytes} this coordinator takes")
    try:
        archive = zipfile.ZipFile(io.BytesIO(blob))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise ModelInvalid(
            "the body is not a model: a model is an .npz archive of numeric arrays (numpy.savez of the state dict)"
        ) from None
    with archive:
        infos = archive.infolist()
        if not infos:
            raise ModelInvalid("the model holds no arrays")
        if len(infos) > MAX_ARRAYS:
            raise ModelInvalid(f"the model holds {len(infos)} arrays, more than {MAX_ARRAYS}")
        unpacked = sum(info.file_size for info in infos)
        if max_bytes is not None and unpacked > max_bytes:
            raise ModelInvalid(f"the model unpacks to {unpacked} bytes, more than the {max_bytes} allowed")
        for info in infos:
            try:
                problem = _member_problem(archive, info)
            except (zipfile.BadZipFile, NotImplementedError, OSError, EOFError) as exc:
                problem = f"{info.filename!r} cannot be read ({type(exc).__name__})"
            if problem:
                raise ModelInvalid(f"the body is not a model: {problem}")
    return len(infos)


def encode_frame(head: dict[str, Any], arrays: dict[str, np.ndarray]) -> bytes:
    """A JSON header and an archive of arrays, as one byte string."""
    text = json.dumps(head).encode()
    return _LENGTH.pack(len(text)) + text + pack_arrays(arrays)


def frame_header(blob: bytes) -> dict[str, Any]:
    """The JSON header of a frame, without touching its arrays."""
    (size,) = _LENGTH.unpack_from(blob)
    head = json.loads(blob[_LENGTH.size : _LENGTH.size + size])
    if not isinstance(head, dict):
        raise ValueError("a frame's header must be a JSON object")
    return head


def decode_frame(blob: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (size,) = _LENGTH.unpack_from(blob)
    return frame_header(blob), unpack_arrays(blob[_LENGTH.size + size :])


__all__ = [
    "MODEL_DTYPE_KINDS",
    "ModelInvalid",
    "check_model",
    "decode_frame",
    "encode_frame",
    "frame_header",
    "pack_arrays",
    "unpack_arrays",
]
