"""Data-plane messages: generated text on its way to the node that owns the request.

These never enter the event log; only the task's lifecycle does.
"""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.chat import FinishReason
from exo.shared.types.ids import TaskId


class TokenChunk(Frozen):
    kind: Literal["token"] = "token"
    task_id: TaskId
    # Text made complete by this token (may be "" while a UTF-8 sequence or stop prefix is held).
    text: str
    token_id: int


class StreamEnd(Frozen):
    kind: Literal["end"] = "end"
    task_id: TaskId
    finish_reason: FinishReason
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    time_to_first_token_ms: float = Field(ge=0.0)
    decode_tokens_per_s: float = Field(ge=0.0)


# A generation that failed because of the request itself, not the cluster: the API answers
# it as the client's mistake (HTTP 400), with this as the OpenAI error code.
RequestErrorCode = Literal["context_length_exceeded"]


class StreamError(Frozen):
    kind: Literal["error"] = "error"
    task_id: TaskId
    message: str
    code: RequestErrorCode | None = None


StreamMessage = Annotated[TokenChunk | StreamEnd | StreamError, Field(discriminator="kind")]
