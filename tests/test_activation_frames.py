"""The engine-neutral activation frame codec: round trips, and which faults fail what."""

import io
import struct

import numpy as np
import pytest

from exo.shared.types.ids import NodeId, TaskId
from exo.worker.pipeline.frames import (
    HEADER_BYTES,
    MAGIC,
    BeginRequest,
    FrameFlag,
    FrameKind,
    FrameRejected,
    StreamCorrupt,
    WireDtype,
    check_activation,
    check_begin,
    check_token,
    encode,
    encode_array,
    encode_begin,
    encode_end,
    encode_token,
    read_frame,
)
from tests.factories import chat_params

HIDDEN = 8


def frames(*encoded: bytes) -> io.BytesIO:
    return io.BytesIO(b"".join(encoded))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_activation_round_trips_bit_exactly(dtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((1, 5, HIDDEN)).astype(dtype)
    stream = frames(encode_array(FrameKind.ACTIVATION, "req-1", 17, FrameFlag.SAMPLE, x))
    frame = read_frame(stream)
    assert frame is not None
    assert (frame.kind, frame.request_id, frame.step) == (FrameKind.ACTIVATION, "req-1", 17)
    assert frame.flags == FrameFlag.SAMPLE
    got = check_activation(frame, HIDDEN)
    assert got.dtype == np.dtype(dtype) and np.array_equal(got, x)
    assert read_frame(stream) is None  # a clean end between frames


def test_header_is_little_endian_and_fixed_size() -> None:
    raw = encode_token("r", 3, 42, final=True)
    assert raw[:4] == MAGIC
    (step,) = struct.unpack_from("<Q", raw, 16)
    assert step == 3
    assert len(raw) == HEADER_BYTES + 4 + 1 + 4  # one dim, "r", one int32


def test_token_begin_and_end_frames() -> None:
    begin = BeginRequest(
        task_id=TaskId("t"),
        owner=NodeId("node-a"),
        params=chat_params(),
        prompt_tokens=3,
        max_tokens=5,
        context_tokens=8,
    )
    stream = frames(
        encode_begin(begin), encode_token("t", 3, 99, final=False), encode_end("t", "x", True)
    )
    first, token, end = read_frame(stream), read_frame(stream), read_frame(stream)
    assert first is not None and check_begin(first) == begin
    assert token is not None and check_token(token) == 99 and not token.flags & FrameFlag.FINAL
    assert end is not None and end.kind == FrameKind.END and end.flags & FrameFlag.ERROR
    assert end.payload == b"x"


def test_request_level_faults_are_rejected_without_losing_the_stream() -> None:
    good = np.zeros((1, 2, HIDDEN), dtype=np.float32)
    wrong_width = np.zeros((1, 2, HIDDEN + 1), dtype=np.float32)
    # A header that claims a shape its payload does not fill.
    short = encode(
        FrameKind.ACTIVATION, "b", 0, FrameFlag.NONE, WireDtype.FLOAT32, (1, 4, HIDDEN), b"\0" * 8
    )
    bad_dtype = bytearray(
        encode(
            FrameKind.ACTIVATION, "c", 0, FrameFlag.NONE, WireDtype.FLOAT32, (1, 1, 2), b"\0" * 8
        )
    )
    bad_dtype[6] = 9  # the dtype byte: a code no version defines
    ints = encode_array(
        FrameKind.ACTIVATION, "d", 0, FrameFlag.NONE, np.zeros((1, 1, HIDDEN), "<i4")
    )
    stream = frames(
        encode_array(FrameKind.ACTIVATION, "a", 0, FrameFlag.NONE, wrong_width),
        short,
        bytes(bad_dtype),
        ints,
        encode_array(FrameKind.ACTIVATION, "e", 0, FrameFlag.NONE, good),
    )
    for reason in ("hidden size", "needs", "dtype", "dtype"):
        frame = read_frame(stream)
        assert frame is not None
        with pytest.raises(FrameRejected, match=reason):
            check_activation(frame, HIDDEN)
    last = read_frame(stream)
    assert last is not None and last.request_id == "e"
    assert check_activation(last, HIDDEN).shape == (1, 2, HIDDEN)


def test_stream_level_faults_close_the_link() -> None:
    raw = encode_token("r", 0, 1, final=False)
    with pytest.raises(StreamCorrupt, match="magic"):
        read_frame(frames(b"NOPE" + raw[4:]))
    with pytest.raises(StreamCorrupt, match="version"):
        read_frame(frames(raw[:4] + b"\x09" + raw[5:]))
    with pytest.raises(StreamCorrupt, match="inside a frame"):
        read_frame(frames(raw[:-2]))
    huge = bytearray(raw)
    struct.pack_into("<Q", huge, 24, 1 << 40)
    with pytest.raises(StreamCorrupt, match="exceeds"):
        read_frame(frames(bytes(huge)))


def test_token_frames_must_hold_one_int32() -> None:
    frame = read_frame(
        frames(encode_array(FrameKind.TOKEN, "r", 0, FrameFlag.NONE, np.zeros(2, "<i4")))
    )
    assert frame is not None
    with pytest.raises(FrameRejected):
        check_token(frame)
