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
