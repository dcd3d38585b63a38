"""The supervisor <-> runner subprocess protocol: length-prefixed JSON frames on stdin/stdout."""

import struct
from typing import Annotated, BinaryIO, Literal

from pydantic import Field, TypeAdapter

from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.ids import NodeId, TaskId
from exo.shared.types.instances import EngineName
from exo.shared.types.runners import RunnerStatus
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk

MAX_FRAME_BYTES = 16 * 1024 * 1024
# The CPUs a runner runs on ("0,1"), set by its supervisor for stages that share a node's
# cores; the runner applies it before it starts any thread.
RUNNER_CPUS_ENV = "EXO_RUNNER_CPUS"
# A torch stage that shares a node's cores with other stages of its instance: its thread
# counts "own,all" (its share of the cores, and all of them), set by its supervisor.
RUNNER_THREADS_ENV = "EXO_RUNNER_THREADS"
_LEN = struct.Struct(">I")


class LoadShard(Frozen):
    kind: Literal["load_shard"] = "load_shard"
    model_dir: str
    engine: EngineName
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    n_layers: int = Field(gt=0)
    # Pipeline stages only (a shard holding every layer needs no link): the listening socket,
    # inherited from the worker, on which this runner accepts the previous stage's
    # activations, and the per-step bound.
    listen_fd: int | None = Field(default=None, ge=3)
    step_timeout_s: float = Field(default=60.0, gt=0)


class Generate(Frozen):
    kind: Literal["generate"] = "generate"
    task_id: TaskId
    params: ChatParams
    # The node whose API holds the client: the pipeline's last stage streams tokens there.
    owner: NodeId | None = None


class ConnectNext(Frozen):
    """Pipeline stages: where the next stage listens (from the last stage: the first)."""

    kind: Literal["connect_next"] = "connect_next"
    host: str
    port: int = Field(gt=0, lt=65536)


class Cancel(Frozen):
    kind: Literal["cancel"] = "cancel"
    task_id: TaskId


class Shutdown(Frozen):
    kind: Literal["shutdown"] = "shutdown"


ToRunner = Annotated[
    LoadShard | Generate | Cancel | Shutdown | ConnectNext, Field(discriminator="kind")
]


class StatusReport(Frozen):
    kind: Literal["status"] = "status"
    status: RunnerStatus


class GenerationStarted(Frozen):
    """Prefill begins for this task (it left the runner's queue)."""

    kind: Literal["started"] = "started"
    task_id: TaskId


class StageJoined(Frozen):
    """A pipeline stage took on a task (its BEGIN frame arrived); the owner gets its errors."""

    kind: Literal["stage_joined"] = "stage_joined"
    task_id: TaskId
    owner: NodeId
    # The request's time in the pipeline before its BEGIN reached this stage.
    elapsed_ms: float = Field(default=0.0, ge=0.0)


class StageLeft(Frozen):
    """A pipeline stage released a task's cache: it holds nothing of it any more."""

    kind: Literal["stage_left"] = "stage_left"
    task_id: TaskId


FromRunnerMessage = (
    StatusReport
    | GenerationStarted
    | TokenChunk
    | StreamEnd
    | StreamError
    | StageJoined
    | StageLeft
)
FromRunner = Annotated[FromRunnerMessage, Field(discriminator="kind")]

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
