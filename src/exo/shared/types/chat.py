"""The generation request as the control plane carries it (already validated by the API)."""

from typing import Literal

from pydantic import Field

from exo.shared.types.base import Frozen


class ChatMessage(Frozen):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class SamplingParams(Frozen):
    max_tokens: int = Field(ge=1)
    temperature: float = Field(ge=0.0, le=2.0)
    top_p: float = Field(gt=0.0, le=1.0)
    seed: int | None = None
    stop: tuple[str, ...] = ()


class ChatParams(Frozen):
    messages: tuple[ChatMessage, ...] = Field(min_length=1)
    sampling: SamplingParams


FinishReason = Literal["stop", "length", "cancelled", "error"]
