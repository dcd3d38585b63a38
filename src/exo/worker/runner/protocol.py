"""The supervisor <-> runner subprocess protocol: length-prefixed JSON frames on stdin/stdout."""

import struct
from typing import Annotated, BinaryIO, Literal

from pydantic import Field, TypeAdapter

from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.ids import TaskId
from exo.shared.types.instances import EngineName
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk

MAX_FRAME_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct(">I")


class LoadShard(Frozen):
    kind: Literal["load_shard"] = "load_shard"
    model_dir: str
    engine: EngineName
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    n_layers: int = Field(gt=0)


class Generate(Frozen):
    kind: Literal["generate"] = "generate"
    task_id: TaskId
    params: ChatParams


class Cancel(Frozen):
    kind: Literal["cancel"] = "cancel"
    task_id: TaskId


class Shutdown(Frozen):
    kind: Literal["shutdown"] = "shutdown"


ToRunner = Annotated[LoadShard | Generate | Cancel | Shutdown, Field(discriminator="kind")]


class StatusReport(Frozen):
    kind: Literal["status"] = "status"
    status: RunnerStatus


class GenerationStarted(Frozen):
    """Prefill begins for this task (it left the runner's queue)."""

    kind: Literal["started"] = "started"
    task_id: TaskId


FromRunner = Annotated[
    StatusReport | GenerationStarted | TokenChunk | StreamEnd | StreamError,
    Field(discriminator="kind"),
]

TO_RUNNER: TypeAdapter[ToRunner] = TypeAdapter(ToRunner)
FROM_RUNNER: TypeAdapter[FromRunner] = TypeAdapter(FromRunner)


class FrameError(ValueError):
    """A frame that is oversized, truncated or not a valid message."""


def encode_frame(payload: bytes) -> bytes:
    if len(payload) > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {len(payload)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LEN.pack(len(payload)) + payload


def frame_length(header: bytes) -> int:
    (length,) = _LEN.unpack(header)
    if length > MAX_FRAME_BYTES:
        raise FrameError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


HEADER_BYTES = _LEN.size


def read_frame_sync(stream: BinaryIO) -> bytes | None:
    """Blocking read of one frame; None at a clean end of stream."""
    header = stream.read(HEADER_BYTES)
    if not header:
        return None
    if len(header) < HEADER_BYTES:
        raise FrameError("truncated frame header")
    length = frame_length(header)
    payload = stream.read(length)
    if len(payload) < length:
        raise FrameError("truncated frame payload")
    return payload
