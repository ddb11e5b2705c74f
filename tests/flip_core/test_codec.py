"""The one array codec and the model check."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from flip_core.codec import (
    ModelInvalid,
    check_model,
    decode_frame,
    encode_frame,
    frame_header,
    pack_arrays,
    unpack_arrays,
)


def test_arrays_round_trip_with_their_dtypes_and_shapes() -> None:
    arrays = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "n": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
    }
    back = unpack_arrays(pack_arrays(arrays))
    assert set(back) == set(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)


def test_a_frame_carries_its_header_readable_without_its_arrays() -> None:
    blob = encode_frame({"run_id": "r1", "round": 3}, {"w": np.ones(4)})
    assert frame_header(blob) == {"run_id": "r1", "round": 3}
    head, arrays = decode_frame(blob)
    assert head["round"] == 3 and np.array_equal(arrays["w"], np.ones(4))


def test_a_state_dict_is_a_model() -> None:
    assert (
        check_model(
            pack_arrays(
                {
                    "weight": np.zeros((2, 3), np.float32),
                    "bias": np.zeros(2, np.float16),
                    "steps": np.array(5, np.int64),
                }
            )
        )
        == 3
    )


def _zip(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("blob", "said"),
    [
        (b"", "not a model"),
        (b"\x80\x04K\x01.", "not a model"),  # a pickle
        (pack_arrays({}), "holds no arrays"),
        (pack_arrays({"w": np.array(["a"])}), "not a number type"),
        (pack_arrays({"w": np.array([None], dtype=object)}), "not a number type"),
        (_zip("w.txt", b"x"), "'w.txt' is not an array"),
        (_zip("w.npy", b"\x93NUMPY\x01\x00junk"), "is not an array"),
        (pack_arrays({"w": np.zeros(50)})[:-30], "not a model"),
    ],
)
def test_bytes_that_only_claim_to_be_a_model_are_refused(blob: bytes, said: str) -> None:
    with pytest.raises(ModelInvalid, match=said):
        check_model(blob)


def test_a_model_bigger_than_allowed_is_refused_before_it_is_read() -> None:
    blob = pack_arrays({"w": np.zeros(1000)})
    with pytest.raises(ModelInvalid, match="more than the 100"):
        check_model(blob, max_bytes=100)
    array = io.BytesIO()
    np.save(array, np.zeros(1000))
    deflated = io.BytesIO()
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("w.npy", array.getvalue())
    with pytest.raises(ModelInvalid, match="unpacks to"):  # small on the wire, large once unpacked
        check_model(deflated.getvalue(), max_bytes=2000)


def _varied() -> dict[str, np.ndarray]:
    """Arrays of every kind a state dict has, and the awkward ones: 0-d, empty, F-ordered, a strided slice."""
    return {
        "layer.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "double": np.linspace(0, 1, 7),
        "steps": np.array(5, dtype=np.int64),
        "pixels": np.arange(10, dtype=np.uint8),
        "mask": np.array([[True, False], [False, True]]),
        "half": np.ones(3, dtype=np.float16),
        "none": np.zeros((0,), dtype=np.float32),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
        "strided": np.arange(30, dtype=np.int32).reshape(5, 6)[::2, 1::2],
        "big_endian": np.arange(4, dtype=">i4"),
        "poids_é.ü": np.full((2, 2), 3.5, dtype=np.float32),
    }


def _same(back: dict[str, np.ndarray], arrays: dict[str, np.ndarray]) -> None:
    assert list(back) == list(arrays)
    for name, value in arrays.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), name


def test_every_dtype_and_shape_round_trips() -> None:
    arrays = _varied()
    _same(unpack_arrays(pack_arrays(arrays)), arrays)
    _same(unpack_arrays(bytearray(pack_arrays(arrays))), arrays)
    assert unpack_arrays(pack_arrays({})) == {}


def test_what_is_packed_is_an_npz_that_numpy_and_zipfile_read() -> None:
    arrays = _varied()
    blob = pack_arrays(arrays)
    assert isinstance(blob, bytes)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert archive.testzip() is None  # every member's CRC-32 is right
        assert [info.compress_type for info in archive.infolist()] == [zipfile.ZIP_STORED] * len(arrays)
        assert archive.namelist() == [f"{name}.npy" for name in arrays]
        assert [info.flag_bits & 0x800 for info in archive.infolist()] == [0] * (len(arrays) - 1) + [0x800]  # UTF-8
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        _same({name: npz[name] for name in npz.files}, arrays)
        assert npz["fortran"].flags.f_contiguous  # F order in its header, as np.save writes it
    assert pack_arrays(arrays) == blob  # no time stamps: the same arrays make the same bytes
    assert check_model(blob) == check_model(bytearray(blob)) == len(arrays)


def test_archives_numpy_writes_are_read_too() -> None:
    arrays = _varied()
    for save in (np.savez, np.savez_compressed):
        buffer = io.BytesIO()
        save(buffer, **arrays)
        _same(unpack_arrays(buffer.getvalue()), arrays)
        _same(unpack_arrays(memoryview(buffer.getvalue())), arrays)


def test_arrays_are_views_into_the_bytes_they_came_in() -> None:
    arrays = _varied()
    blob = bytearray(pack_arrays(arrays))
    back = unpack_arrays(blob)
    whole = np.frombuffer(blob, dtype=np.uint8)
    for name in arrays:
        assert back[name].flags.aligned, name
        if back[name].size:
            assert np.shares_memory(back[name], whole), name
    assert back["layer.0.weight"].flags.writeable
    back["layer.0.weight"][0, 0] = 42.0
    assert unpack_arrays(blob)["layer.0.weight"][0, 0] == 42.0
    frozen = unpack_arrays(bytes(blob))["layer.0.weight"]
    assert not frozen.flags.writeable and frozen.flags.aligned


def test_bytes_that_are_no_archive_or_a_broken_one_raise_value_error() -> None:
    blob = pack_arrays({"w": np.zeros(50), "b": np.ones(3)})
    for broken in (b"", b"junk", b"\x80\x04K\x01.", blob[:-30], blob[:100] + blob[120:], blob[:-200] + blob[-150:]):
        with pytest.raises(ValueError):
            unpack_arrays(broken)


def test_a_member_whose_size_disagrees_with_its_header_is_refused() -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"shape": (10,), "fortran_order": False, "descr": "<f8"})
    with pytest.raises(ValueError, match="truncated or padded"):
        unpack_arrays(_zip("w.npy", header.getvalue() + bytes(8 * 9)))


def test_object_arrays_are_refused_when_read() -> None:
    with pytest.raises(ValueError, match="allow_pickle=False"):
        unpack_arrays(pack_arrays({"w": np.array([None], dtype=object)}))
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"shape": (1,), "fortran_order": False, "descr": "|O"})
    with pytest.raises(ValueError, match="allow_pickle=False"):
        unpack_arrays(_zip("w.npy", header.getvalue() + b"\x80\x04K\x01."))


def test_a_frame_round_trips_in_one_piece() -> None:
    arrays = _varied()
    blob = encode_frame({"run_id": "r1", "round": 2}, arrays)
    assert isinstance(blob, bytes)
    assert frame_header(blob) == {"run_id": "r1", "round": 2}
    head, back = decode_frame(blob)
    assert head == {"run_id": "r1", "round": 2}
    _same(back, arrays)
    assert all(array.flags.aligned for array in back.values())
    (size,) = np.frombuffer(blob[:8], dtype="<u8")
    archive = blob[8 + int(size) :]  # the archive alone, as the frame holds it
    with zipfile.ZipFile(io.BytesIO(archive)) as zipped:
        assert zipped.testzip() is None
    _same(unpack_arrays(archive), arrays)
    head, back = decode_frame(bytearray(blob))
    assert back["double"].flags.writeable
    _same(decode_frame(encode_frame({}, {"o": np.array(["a", "bc"])}))[1], {"o": np.array(["a", "bc"])})


def test_packing_copies_each_array_once_and_unpacking_copies_nothing() -> None:
    import tracemalloc

    arrays = {"w": np.ones(10_000_000, dtype=np.float32), "b": np.zeros(10, dtype=np.float32)}  # 40 MB
    tracemalloc.start()
    try:
        blob = pack_arrays(arrays)
        _, packing = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        buffer = bytearray(blob)
        del blob
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        back = unpack_arrays(buffer)
        _, unpacking = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert packing < 1.05 * arrays["w"].nbytes  # np.savez: 1.26 times (its BytesIO grows, then getvalue())
    assert unpacking - before < 1 << 20
    assert np.array_equal(back["w"], arrays["w"])


@pytest.mark.parametrize("limit", ["_ZIP_LIMIT", "_COUNT_LIMIT"])
def test_an_archive_that_would_need_zip64_is_left_to_numpy(monkeypatch: pytest.MonkeyPatch, limit: str) -> None:
    import flip_core.codec

    arrays = {"w": np.arange(500, dtype=np.float64), "b": np.ones(2)}
    with zipfile.ZipFile(io.BytesIO(pack_arrays(arrays))) as archive:
        assert archive.infolist()[0].extract_version == 20  # this module's writer
    monkeypatch.setattr(flip_core.codec, limit, 2)  # as if the archive were 4 GiB, or had 65535 members
    blob = pack_arrays(arrays)
    with zipfile.ZipFile(io.BytesIO(blob)) as archive:
        assert archive.infolist()[0].extract_version == 45  # np.savez's, which always marks members ZIP64
    _same(unpack_arrays(blob), arrays)
    _same(decode_frame(encode_frame({"round": 1}, arrays))[1], arrays)


def test_a_frames_header_is_rewritten_in_place_only_within_its_room() -> None:
    from flip_core.codec import decode_frame, encode_frame, rewrite_header

    arrays = {"w": np.arange(12, dtype=np.float32)}
    frame = bytearray(encode_frame({"status": "ok"}, arrays, reserve=64))
    assert rewrite_header(frame, {"status": "ok", "withheld": "1 metric withheld"})
    head, back = decode_frame(frame)
    assert head == {"status": "ok", "withheld": "1 metric withheld"} and np.array_equal(back["w"], arrays["w"])
    tight = bytearray(encode_frame({"status": "ok"}, arrays))
    assert not rewrite_header(tight, {"status": "ok", "withheld": "longer than the room"})
    assert decode_frame(tight)[0] == {"status": "ok"}  # untouched


def test_only_the_codecs_own_bytes_count_as_canonical() -> None:
    from flip_core.codec import archive_is_canonical, decode_frame, encode_frame

    arrays = {"w": np.arange(100, dtype=np.float32), "b": np.ones(3)}
    frame = bytearray(encode_frame({"status": "ok"}, arrays, reserve=16))
    _, decoded = decode_frame(frame)
    assert archive_is_canonical(frame, decoded)
    assert not archive_is_canonical(frame + b"x", decode_frame(frame + b"x")[1])  # a byte after the end
    padded = bytearray(frame)
    first = padded.index(b"w.npy") + len(b"w.npy") + 4  # inside the alignment padding of the first member
    padded[first] ^= 0xFF
    assert not archive_is_canonical(padded, decode_frame(padded)[1])


def test_no_bytes_make_the_model_check_raise_anything_but_a_sentence(tmp_path) -> None:
    """Hostile uploads: every mutation and cut of a stored and a deflated model is a model or a ModelInvalid (never
    another exception, which the hub would answer with a 500), read from bytes or from a file alike."""
    import random

    stored = pack_arrays({"w": np.arange(64, dtype=np.float32), "b": np.zeros(3)})
    deflated = io.BytesIO()
    np.savez_compressed(deflated, w=np.arange(64, dtype=np.float32))
    rng = random.Random(25)
    for i in range(1500):
        blob = bytearray(rng.choice([stored, deflated.getvalue()]))
        if i % 3:
            for _ in range(rng.randint(1, 6)):
                blob[rng.randrange(len(blob))] = rng.randrange(256)
        else:
            blob = blob[: rng.randrange(len(blob))]
        path = tmp_path / "upload"
        path.write_bytes(blob)
        for source in (bytes(blob), path):
            try:
                check_model(source, 1 << 20)
            except ModelInvalid:
                pass
