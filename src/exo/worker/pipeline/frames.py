"""The activation stream between pipeline stages: engine-neutral binary frames.

Every frame is one fixed little-endian header, the shape, the request id and the raw
payload (layout in docs/pipeline.md):

    magic "EXOF" | version u8 | kind u8 | dtype u8 | ndim u8 | flags u16 | id length u16
    | reserved u32 | step u64 | payload length u64 | dims u32 * ndim | request id | payload

Two kinds of fault are told apart. A frame whose magic, version or lengths are wrong
cannot be trusted to say where the next frame starts: `StreamCorrupt`, and the link is
closed. A frame that is well delimited but wrong for its request (unknown dtype, a shape
that does not match the payload size or the stage's hidden size) fails only that request
(`check_activation`, `check_token`).
"""

import enum
import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt
from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.ids import NodeId, TaskId

MAGIC = b"EXOF"
VERSION = 1
# Fixed part of the header, then ndim dims, then the request id, then the payload.
_HEADER = struct.Struct("<4sBBBBHHIQQ")
HEADER_BYTES = _HEADER.size
MAX_NDIM = 4
MAX_REQUEST_ID_BYTES = 256
# A whole prefill chunk of a large model fits (e.g. 512 tokens x 16384 x 4 bytes = 32 MiB).
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024


class FrameKind(enum.IntEnum):
    # A request enters the pipeline: JSON `BeginRequest` payload.
    BEGIN = 1
    # Hidden states [1, L, hidden] for positions [step, step + L).
    ACTIVATION = 2
    # The last stage's sampled token on its way back to the first: int32 [1].
    TOKEN = 3
    # The request is over on the sender: release it. UTF-8 reason payload.
    END = 4


class FrameFlag(enum.IntFlag):
    NONE = 0
    # ACTIVATION: the last stage samples a token from the frame's last position.
    SAMPLE = 1
    # TOKEN: the stream ended with this token; the first stage releases the request.
    FINAL = 2
    # END: the request failed (as opposed to finished or cancelled).
    ERROR = 4


class WireDtype(enum.IntEnum):
    NONE = 0
    FLOAT32 = 1
    FLOAT16 = 2
    INT32 = 3


_NUMPY: dict[WireDtype, np.dtype[Any]] = {
    WireDtype.FLOAT32: np.dtype("<f4"),
    WireDtype.FLOAT16: np.dtype("<f2"),
    WireDtype.INT32: np.dtype("<i4"),
}


class StreamCorrupt(ValueError):
    """The byte stream is out of step (bad magic, version or lengths): close the link."""


class FrameRejected(ValueError):
    """A well-delimited frame that is wrong for its request: fail that request only."""


@dataclass(frozen=True)
class Frame:
    kind: FrameKind
    request_id: str
    step: int
    flags: FrameFlag
    # The raw code as received (validated by `check_*`, not by the decoder).
    dtype: int
    shape: tuple[int, ...]
    payload: bytes


class BeginRequest(Frozen):
    """What every stage needs to know about a request, sent once before its activations."""

    task_id: TaskId
    # The node whose API holds the client connection (the last stage streams tokens there).
    owner: NodeId
    params: ChatParams
    prompt_tokens: int
    max_tokens: int
    # KV cache room every stage allocates: prompt + completion.
    context_tokens: int
    # How long the request has been in the pipeline when this BEGIN leaves its stage (the
    # first stage's queue and tokenization, each stage's turn-around): nodes share no clock,
    # so the last stage counts its time to first token from its arrival minus this.
    elapsed_ms: float = Field(default=0.0, ge=0.0)


def encode(
    kind: FrameKind,
    request_id: str,
    step: int = 0,
    flags: FrameFlag = FrameFlag.NONE,
    dtype: WireDtype = WireDtype.NONE,
    shape: tuple[int, ...] = (),
    payload: bytes = b"",
) -> bytes:
    rid = request_id.encode()
    if not 0 < len(rid) <= MAX_REQUEST_ID_BYTES:
        raise ValueError(f"request id of {len(rid)} bytes")
    if len(shape) > MAX_NDIM:
        raise ValueError(f"{len(shape)} dimensions exceed {MAX_NDIM}")
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    header = _HEADER.pack(
        MAGIC, VERSION, kind, dtype, len(shape), flags, len(rid), 0, step, len(payload)
    )
    dims = struct.pack(f"<{len(shape)}I", *shape)
    return b"".join((header, dims, rid, payload))


def encode_array(
    kind: FrameKind, request_id: str, step: int, flags: FrameFlag, array: npt.NDArray[Any]
) -> bytes:
    """An activation or token frame from a float32/float16/int32 numpy array."""
    code = next((c for c, d in _NUMPY.items() if d == array.dtype.newbyteorder("<")), None)
    if code is None:
        raise ValueError(f"no wire dtype for {array.dtype}")
    data = np.ascontiguousarray(array, dtype=_NUMPY[code])
    return encode(kind, request_id, step, flags, code, tuple(data.shape), data.tobytes())


def encode_begin(begin: BeginRequest) -> bytes:
    return encode(FrameKind.BEGIN, begin.task_id, payload=begin.model_dump_json().encode())


def encode_token(request_id: str, step: int, token_id: int, final: bool) -> bytes:
    flags = FrameFlag.FINAL if final else FrameFlag.NONE
    array = np.array([token_id], dtype="<i4")
    return encode_array(FrameKind.TOKEN, request_id, step, flags, array)


def encode_end(request_id: str, reason: str, error: bool) -> bytes:
    flags = FrameFlag.ERROR if error else FrameFlag.NONE
    return encode(FrameKind.END, request_id, flags=flags, payload=reason.encode()[:4096])


def _read_exactly(stream: BinaryIO, n: int) -> bytes | None:
    """n bytes, or None at a clean end of stream before the first byte."""
    data = stream.read(n)
    if not data:
        return None if n else b""
    if len(data) < n:
        raise StreamCorrupt(f"stream ended inside a frame ({len(data)} of {n} bytes)")
    return data


def read_frame(stream: BinaryIO) -> Frame | None:
    """One frame from a blocking byte stream; None at a clean end of stream."""
    head = _read_exactly(stream, HEADER_BYTES)
    if head is None:
        return None
    magic, version, kind, dtype, ndim, flags, rid_len, _, step, length = _HEADER.unpack(head)
    if magic != MAGIC:
        raise StreamCorrupt(f"bad magic {magic!r}")
    if version != VERSION:
        raise StreamCorrupt(f"unsupported frame version {version}")
    if ndim > MAX_NDIM or not 0 < rid_len <= MAX_REQUEST_ID_BYTES:
        raise StreamCorrupt(f"bad header lengths (ndim {ndim}, request id {rid_len} bytes)")
    if length > MAX_PAYLOAD_BYTES:
        raise StreamCorrupt(f"payload of {length} bytes exceeds {MAX_PAYLOAD_BYTES}")
    rest = _read_exactly(stream, 4 * ndim + rid_len + length)
    if rest is None:
        raise StreamCorrupt("stream ended after a frame header")
    shape = struct.unpack_from(f"<{ndim}I", rest)
    rid_end = 4 * ndim + rid_len
    try:
        request_id = rest[4 * ndim : rid_end].decode()
    except UnicodeDecodeError as exc:
        raise StreamCorrupt(f"request id is not UTF-8: {exc}") from None
    try:
        frame_kind = FrameKind(kind)
    except ValueError:
        raise StreamCorrupt(f"unknown frame kind {kind}") from None
    return Frame(
        kind=frame_kind,
        request_id=request_id,
        step=step,
        flags=FrameFlag(flags & 0b111),
        dtype=dtype,
        shape=tuple(shape),
        payload=rest[rid_end:],
    )


def _array(frame: Frame) -> npt.NDArray[Any]:
    try:
        dtype = _NUMPY[WireDtype(frame.dtype)]
    except (ValueError, KeyError):
        raise FrameRejected(f"unsupported dtype code {frame.dtype}") from None
    expected = int(np.prod(frame.shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(frame.payload):
        raise FrameRejected(
            f"shape {frame.shape} of {dtype} needs {expected} bytes, payload has "
            f"{len(frame.payload)}"
        )
    return np.frombuffer(frame.payload, dtype=dtype).reshape(frame.shape)


def check_activation(frame: Frame, hidden_size: int) -> npt.NDArray[Any]:
    """The hidden states [1, L, hidden] a frame carries, or FrameRejected saying why."""
    if frame.dtype not in (WireDtype.FLOAT32, WireDtype.FLOAT16):
        raise FrameRejected(f"activation dtype code {frame.dtype} is not float32/float16")
    if len(frame.shape) != 3 or frame.shape[0] != 1 or frame.shape[1] < 1:
        raise FrameRejected(f"activation shape {frame.shape} is not [1, L, hidden]")
    if frame.shape[2] != hidden_size:
        raise FrameRejected(f"activation width {frame.shape[2]} != hidden size {hidden_size}")
    return _array(frame)


def check_token(frame: Frame) -> int:
    if frame.dtype != WireDtype.INT32 or frame.shape != (1,):
        raise FrameRejected(f"token frame of dtype {frame.dtype}, shape {frame.shape}")
    return int(_array(frame)[0])


def check_begin(frame: Frame) -> BeginRequest:
    try:
        begin = BeginRequest.model_validate_json(frame.payload)
    except ValueError as exc:
        raise FrameRejected(f"bad BEGIN payload: {exc}") from None
    if begin.task_id != frame.request_id:
        raise FrameRejected(f"BEGIN for {begin.task_id} in a frame of {frame.request_id}")
    return begin
