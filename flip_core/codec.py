"""The one array codec: named arrays as an ``.npz`` archive, never pickled.

Model parameters travel between the notebook, the hub and the sites in this form, and a task
step is a *frame*: a JSON header and such an archive (``encode_frame``). Loading never unpickles
(an object array is refused as ``np.load(..., allow_pickle=False)`` refuses it), so nothing
executable can travel. :func:`check_model` tells a real model from bytes that only claim to be
one, by reading each array's header (no data is loaded).

A model of 100M parameters is 400 MB, and each fresh copy of it costs up to a second, so the
archive is written and read here rather than by ``np.savez`` and ``np.load`` (which copy the
bytes several times over: a growing buffer, its value, the zip reads, numpy's chunked reads).
The archive is still an ordinary ``.npz``: an uncompressed (stored) ZIP of ``NAME.npy`` members
in NumPy's ``.npy`` format, which ``np.load`` and ``zipfile`` read as they read any other.
Writing copies each array's bytes once, into the one bytes object returned; reading returns
arrays that are views into the bytes given, with no copy at all. Each array's data starts at a
multiple of 64 bytes from the start of the output (padding in its local header's extra field,
as Android's ``zipalign`` does), so the views are aligned for their dtype. The archive carries
no time stamps, so the same arrays always make the same bytes (and the same SHA-256).
"""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from flip_core.errors import FlipError

# the dtypes a model's arrays may have: booleans, integers, floats (no objects, strings or voids)
MODEL_DTYPE_KINDS = "biuf"
MAX_ARRAYS = 100_000
_LENGTH = struct.Struct("<Q")

# the ZIP records written and read here (the layouts of the zipfile module's structFileHeader,
# structCentralDir and structEndArchive)
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_END = struct.Struct("<4s4H2LH")
_LOCAL_MAGIC = b"PK\x03\x04"
_CENTRAL_MAGIC = b"PK\x01\x02"
_END_MAGIC = b"PK\x05\x06"
_ZIP64_LOCATOR_MAGIC = b"PK\x06\x07"
_ZIP_VERSION = 20  # version 2.0: stored members, no ZIP64 (what zipfile writes for them)
_UNIX = 3  # "made by" a Unix system, so the external attributes below are read as mode bits
_MODE = 0o600 << 16  # the mode zipfile gives a member it writes from a stream
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, the earliest a ZIP can say, at 00:00 (the time field is 0)
_UTF8 = 0x800  # general purpose flag bit 11: the member's name is UTF-8 (else it is ASCII, read as cp437)
_ENCRYPTED = 0x1
_STORED = 0
_ZIP_LIMIT = 0xFFFFFFFF  # sizes and offsets at or over this need ZIP64, which only np.savez writes here
_COUNT_LIMIT = 0xFFFF  # as many members, or more, need ZIP64 too
_ALIGN = 64  # np.lib.format.ARRAY_ALIGN: the .npy header pads the data to this from the member's start
_ALIGNMENT_EXTRA = struct.Struct("<3H")  # zipalign's extra field: id 0xD935, data size, the alignment; then zeros
_ALIGNMENT_ID = 0xD935
_MAX_HEADER_SIZE = 10_000  # the longest .npy header np.load reads by default (np.lib.format._MAX_HEADER_SIZE)


class ModelInvalid(FlipError):
    """Bytes that are not a model: not an ``.npz`` of numeric arrays, or bigger than allowed."""


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as an ``.npz`` archive, each under its name (``NAME.npy`` in the archive, as ``np.savez``
    names it). Each array's bytes are copied once, into the bytes returned (twice for an array that is not
    contiguous); what this writer cannot write (an object array, an archive that needs ZIP64) goes through
    ``np.savez`` as before."""
    pieces = _archive_pieces(arrays, 0)
    return _savez(arrays) if pieces is None else b"".join(pieces)


def _savez(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _npy_header(description: dict[str, Any]) -> bytes | None:
    """The ``.npy`` header np.save writes for an array so described: format 1.0, or 2.0 where the header is
    too long for it; None where only 3.0 will do (field names beyond latin-1, left to np.savez)."""
    for write in (np.lib.format.write_array_header_1_0, np.lib.format.write_array_header_2_0):
        header = io.BytesIO()
        try:
            write(header, description)
        except ValueError:  # too long for 1.0; a UnicodeEncodeError (a ValueError too) for both
            continue
        return header.getvalue()
    return None


def _member_name(name: str) -> tuple[bytes, int]:
    """A member's name as the archive holds it, and its flags: ASCII, or UTF-8 with bit 11 set, as zipfile does."""
    filename = name + ".npy"
    try:
        return filename.encode("ascii"), 0
    except UnicodeEncodeError:
        return filename.encode("utf-8"), _UTF8


def _archive_pieces(arrays: dict[str, np.ndarray], start: int) -> list[bytes | memoryview] | None:
    """The archive of ``arrays`` as pieces whose join is the archive: each member's headers, then its array's
    bytes as a view (no copy unless the array is not contiguous), then the central directory. ``start`` is
    where the archive will begin in the bytes the pieces are joined into, so that each array's data lands at
    a multiple of 64 bytes from their start (the ZIP's offsets count from the archive's own start). None
    where only np.savez can write the archive: an array of objects (which it pickles, and every reader here
    refuses), a dtype without bytes, a header of format 3.0, a name with a NUL in it (zipfile cuts names
    there), or an archive that needs ZIP64 (4 GiB or more, or 65535 members or more): the fallback keeps
    those exactly as they were, and they are rare enough for its copies not to matter."""
    if len(arrays) >= _COUNT_LIMIT:
        return None
    pieces: list[bytes | memoryview] = []
    directory: list[bytes] = []
    offset = 0  # of the next member's local header, from the archive's start
    for name, value in arrays.items():
        if not isinstance(name, str):
            raise TypeError(f"an array's name must be a string, not {type(name).__name__}")
        array = np.asarray(value)
        if array.dtype.hasobject or array.dtype.itemsize == 0 or "\x00" in name:
            return None
        description = np.lib.format.header_data_from_array_1_0(array)
        header = _npy_header(description)
        if header is None:
            return None
        filename, flags = _member_name(name)
        size = len(header) + array.nbytes
        pad = -(start + offset + _LOCAL.size + len(filename)) % _ALIGN
        if 0 < pad < _ALIGNMENT_EXTRA.size:
            pad += _ALIGN
        if offset + _LOCAL.size + len(filename) + pad + size >= _ZIP_LIMIT:
            return None  # checked before the CRC pass, which np.savez would only make again
        # the array's bytes in the order its header says (np.save's): an F-ordered array's transpose is C-ordered
        data = array.T if description["fortran_order"] else np.ascontiguousarray(array)
        flat = data.reshape(-1).view(np.uint8).data
        crc = zlib.crc32(flat, zlib.crc32(header))
        extra = (
            _ALIGNMENT_EXTRA.pack(_ALIGNMENT_ID, pad - 4, _ALIGN) + bytes(pad - _ALIGNMENT_EXTRA.size) if pad else b""
        )
        # the fields the local header and the directory's record share: flags, method, time, date, CRC-32,
        # compressed and uncompressed size, the name's length
        shared = (flags, _STORED, 0, _DOS_DATE, crc, size, size, len(filename))
        local = _LOCAL.pack(_LOCAL_MAGIC, _ZIP_VERSION, 0, *shared, len(extra))
        # then: no extra field, comment, disk number or internal attributes; the mode; the local header's offset
        record = _CENTRAL.pack(_CENTRAL_MAGIC, _ZIP_VERSION, _UNIX, _ZIP_VERSION, 0, *shared, 0, 0, 0, 0, _MODE, offset)
        directory.append(record + filename)
        pieces += [local + filename + extra + header, flat]
        offset += len(local) + len(filename) + len(extra) + size
    central = b"".join(directory)
    if offset + len(central) + _END.size >= _ZIP_LIMIT:
        return None
    pieces.append(central + _END.pack(_END_MAGIC, 0, 0, len(directory), len(directory), len(central), offset, 0))
    return pieces


def unpack_arrays(blob: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` archive, by name. An archive of stored members (the ones
    :func:`pack_arrays` and ``np.savez`` write) is read in place: each array is a view into ``blob``, no
    byte copied, so it is read-only where ``blob`` is ``bytes`` (writable where it is a ``bytearray``), and
    it keeps all of ``blob`` alive while it lives. The exception is an array whose data is not aligned for
    its dtype in memory (np.savez does not align), which is copied. Any other archive (compressed members,
    ZIP64) is read by ``np.load``, so everything np.savez and np.savez_compressed write still loads. Never
    unpickles: an object array raises ``ValueError``, as ``np.load(..., allow_pickle=False)`` does; so do
    bytes that are not an archive, or one that is truncated or whose records disagree. The CRC-32s are not
    checked (that would be a pass over every byte): bytes that come from elsewhere are checked by the
    SHA-256 that names them (:mod:`flip_core.bulk`)."""
    view = _byte_view(blob)
    if view[:4] not in (_LOCAL_MAGIC, _END_MAGIC):  # the test np.load makes for a ZIP
        raise ValueError("the bytes are not an .npz archive")
    members = _stored_members(view)
    if members is not None:
        arrays: dict[str, np.ndarray] = {}
        for name, start, size in members:
            array = _npy_view(view, name, start, size)
            if array is None:
                break
            arrays[name] = array
        else:
            return arrays
    try:
        with np.load(io.BytesIO(blob if isinstance(blob, bytes) else view), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ValueError(f"the bytes are not a readable .npz archive ({exc})") from None


def _byte_view(blob: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(blob)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.c_contiguous else memoryview(view.tobytes())
    return view


def _stored_members(view: memoryview) -> list[tuple[str, int, int]] | None:
    """Each member of the ZIP in ``view`` as its name without ``.npy``, where its bytes start and their
    number; None where the archive is not one this reader takes (a compressed or encrypted member, a name
    not ending in ``.npy``, ZIP64, a comment, bytes before the archive): np.load reads those."""
    total = len(view)
    end = total - _END.size
    if end < 0 or view[end : end + 4] != _END_MAGIC:
        tail = bytes(view[max(0, total - _END.size - 0xFFFF) :])  # an archive's comment is at most 64 KiB
        found = tail.rfind(_END_MAGIC)
        if found < 0:
            raise ValueError("the bytes are not an .npz archive, or a truncated one (its end record is missing)")
        end = total - len(tail) + found
        if end + _END.size > total:
            raise ValueError("the .npz archive is truncated (in its end record)")
    _, disk, directory_disk, here, count, directory_size, directory_at, comment = _END.unpack_from(view, end)
    if end + _END.size + comment != total or (disk, directory_disk) != (0, 0) or here != count:
        return None
    if end >= 20 and view[end - 20 : end - 16] == _ZIP64_LOCATOR_MAGIC:
        return None
    if directory_at + directory_size > end:
        raise ValueError("the .npz archive is truncated or damaged: its central directory runs past its end record")
    if directory_at + directory_size < end:  # bytes before the archive, which zipfile allows for
        return None
    members = []
    at = directory_at
    while at < end:
        if at + _CENTRAL.size > end or view[at : at + 4] != _CENTRAL_MAGIC:
            raise ValueError("the .npz archive's central directory is truncated or damaged")
        record = _CENTRAL.unpack_from(view, at)
        flags, method, packed, size = record[5], record[6], record[10], record[11]
        name_length, extra_length, comment_length, local_at = record[12], record[13], record[14], record[18]
        raw = bytes(view[at + _CENTRAL.size : at + _CENTRAL.size + name_length])
        at += _CENTRAL.size + name_length + extra_length + comment_length
        if at > end:
            raise ValueError("the .npz archive's central directory is truncated or damaged")
        name = raw.decode("utf-8" if flags & _UTF8 else "cp437")
        if method != _STORED or flags & _ENCRYPTED or packed != size or _ZIP_LIMIT in (size, local_at):
            return None
        if not name.endswith(".npy") or "\x00" in name:
            return None
        if local_at + _LOCAL.size > directory_at or view[local_at : local_at + 4] != _LOCAL_MAGIC:
            raise ValueError(f"the .npz archive is damaged: no member {name!r} where its directory says")
        local = _LOCAL.unpack_from(view, local_at)
        start = local_at + _LOCAL.size + local[10] + local[11]
        if start + size > directory_at:
            raise ValueError(f"the .npz archive is truncated or damaged: member {name!r} runs past its end")
        if view[local_at + _LOCAL.size : local_at + _LOCAL.size + local[10]] != raw:
            raise ValueError(f"the .npz archive is damaged: member {name!r} has another name in its own header")
        members.append((name[:-4], start, size))
    if len(members) != count:
        return None
    return members


def _npy_view(view: memoryview, name: str, start: int, size: int) -> np.ndarray | None:
    """The array of the ``.npy`` member at ``view[start:start+size]``, as a view into it; None where the
    member is not one this reader takes (not an array, a format other than 1.0 and 2.0, a dtype without
    bytes): np.load reads those (or refuses them)."""
    end = start + size
    if size < np.lib.format.MAGIC_LEN or bytes(view[start : start + 6]) != np.lib.format.MAGIC_PREFIX:
        return None
    version = (view[start + 6], view[start + 7])
    if version not in ((1, 0), (2, 0)):
        return None
    length = struct.Struct("<H" if version == (1, 0) else "<I")
    if start + np.lib.format.MAGIC_LEN + length.size > end:
        raise ValueError(f"array {name!r} is truncated (in its header)")
    (header_length,) = length.unpack_from(view, start + np.lib.format.MAGIC_LEN)
    if header_length > _MAX_HEADER_SIZE:
        raise ValueError(f"array {name!r} has a header of {header_length} bytes, too large to be read safely")
    data_at = start + np.lib.format.MAGIC_LEN + length.size + header_length
    if data_at > end:
        raise ValueError(f"array {name!r} is truncated (in its header)")
    header = io.BytesIO(view[start:data_at])  # a copy of the header alone
    np.lib.format.read_magic(header)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read(header)
    if dtype.hasobject:
        raise ValueError("Object arrays cannot be loaded when allow_pickle=False")
    if dtype.itemsize == 0:
        return None
    count = math.prod(shape)
    if data_at + count * dtype.itemsize != end:
        raise ValueError(f"array {name!r} is truncated or padded: its member's size is not its header's")
    array = np.frombuffer(view, dtype=dtype, count=count, offset=data_at)
    array = array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)
    return array if array.flags.aligned else array.copy(order="K")


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


# What reading a hostile archive's records and members can raise, besides ModelInvalid: a damaged or crafted
# archive (zipfile, zlib), a header numpy cannot read (ValueError, SyntaxError, RecursionError from its literal
# parser), a record pointing outside the file (a negative seek is a ValueError), an encryption or a version
# zipfile refuses (RuntimeError, NotImplementedError), a name that is not UTF-8 (UnicodeDecodeError, a ValueError).
_UNREADABLE = (
    zipfile.BadZipFile,
    zlib.error,
    struct.error,
    ValueError,
    OSError,
    EOFError,
    NotImplementedError,
    RuntimeError,
    SyntaxError,
    OverflowError,
    TypeError,
    KeyError,
)
# the ways a model's members may be kept: stored (what pack_arrays and np.savez write) or deflated
# (np.savez_compressed); what they unpack to is bounded as a stored model is
_MODEL_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


def check_model(blob: bytes | bytearray | Path, max_bytes: int | None = None) -> int:
    """Raise :class:`ModelInvalid` with a sentence unless ``blob`` (the bytes, or a file holding them: read record
    by record, never whole) is a model; its number of arrays. Whatever the bytes, the answer is the number or a
    :class:`ModelInvalid`: a crafted archive (encrypted, another compression, damaged records, a header numpy
    cannot read, a declared shape its bytes do not fill, a zip bomb) is refused in a sentence."""
    size = blob.stat().st_size if isinstance(blob, Path) else len(blob)
    if max_bytes is not None and size > max_bytes:
        raise ModelInvalid(f"the model is {size} bytes, more than the {max_bytes} this coordinator takes")
    try:
        archive = zipfile.ZipFile(blob if isinstance(blob, Path) else io.BytesIO(blob))
    except _UNREADABLE:
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
            problem = _kept_problem(info)
            if not problem:
                try:
                    problem = _member_problem(archive, info)
                except _UNREADABLE as exc:
                    problem = f"{info.filename!r} cannot be read ({type(exc).__name__})"
            if problem:
                raise ModelInvalid(f"the body is not a model: {problem}")
    return len(infos)


def _kept_problem(info: zipfile.ZipInfo) -> str:
    """Why a member is kept in a way no model is ("" when it is stored or deflated, unencrypted)."""
    if info.flag_bits & _ENCRYPTED:
        return f"{info.filename!r} is encrypted"
    if info.compress_type not in _MODEL_METHODS:
        method = info.compress_type
        return f"{info.filename!r} is compressed with method {method} (a model's arrays are stored or deflated)"
    return ""


def encode_frame(head: dict[str, Any], arrays: dict[str, np.ndarray], reserve: int = 0) -> bytes:
    """A JSON header and an archive of arrays, as one byte string: the header's length (8 bytes, little
    endian), the header, the archive, written in one piece (each array's bytes copied once).

    ``reserve``: spaces after the JSON (still valid JSON), room for :func:`rewrite_header` to put a longer
    header in place later without copying the archive."""
    text = json.dumps(head).encode() + b" " * reserve
    prefix = _LENGTH.pack(len(text)) + text
    pieces = _archive_pieces(arrays, len(prefix))
    return prefix + _savez(arrays) if pieces is None else b"".join([prefix, *pieces])


def archive_is_canonical(frame: bytes | bytearray, arrays: dict[str, np.ndarray]) -> bool:
    """Whether the archive in ``frame`` (after its header) is byte for byte what this codec writes for
    ``arrays`` and nothing else: no byte hidden in padding, extra fields, a comment or after the end. A site
    checks this before it lets a task process's own bytes leave (``site_agent.governance.gate``)."""
    view = _byte_view(frame)
    (size,) = _LENGTH.unpack_from(view)
    start = _LENGTH.size + size
    pieces = _archive_pieces(arrays, start)
    if pieces is None:
        return False
    offset = start
    whole = np.frombuffer(view, dtype=np.uint8)
    for piece in pieces:
        length = len(piece) if isinstance(piece, bytes) else piece.nbytes
        if offset + length > len(whole):
            return False
        if isinstance(piece, bytes):
            if view[offset : offset + length] != piece:
                return False
        else:  # an array's bytes: the decoded array is a view of the frame right here, or its equal
            theirs = np.frombuffer(piece, dtype=np.uint8)
            here = whole[offset : offset + length]
            if theirs.ctypes.data != here.ctypes.data and not np.array_equal(theirs, here):
                return False
        offset += length
    return bool(offset == len(whole))


def rewrite_header(frame: bytearray, head: dict[str, Any]) -> bool:
    """Replace a frame's header in place (the archive untouched, nothing copied); False when ``head`` does
    not fit the room the frame has for its header (:func:`encode_frame`'s ``reserve``)."""
    (size,) = _LENGTH.unpack_from(frame)
    text = json.dumps(head).encode()
    if len(text) > size:
        return False
    frame[_LENGTH.size : _LENGTH.size + size] = text + b" " * (size - len(text))
    return True


def frame_header(blob: bytes | bytearray | memoryview) -> dict[str, Any]:
    """The JSON header of a frame, without touching its arrays."""
    (size,) = _LENGTH.unpack_from(blob)
    head = json.loads(bytes(blob[_LENGTH.size : _LENGTH.size + size]))
    if not isinstance(head, dict):
        raise ValueError("a frame's header must be a JSON object")
    return head


def decode_frame(blob: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A frame's header and arrays; the arrays are views into ``blob``, as :func:`unpack_arrays` says."""
    view = _byte_view(blob)
    (size,) = _LENGTH.unpack_from(view)
    return frame_header(view), unpack_arrays(view[_LENGTH.size + size :])


__all__ = [
    "MODEL_DTYPE_KINDS",
    "ModelInvalid",
    "check_model",
    "decode_frame",
    "encode_frame",
    "frame_header",
    "archive_is_canonical",
    "rewrite_header",
    "pack_arrays",
    "unpack_arrays",
]
