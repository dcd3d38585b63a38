"""The generation request as the control plane carries it (already validated by the API)."""

from typing import Literal, Self

from pydantic import Field, model_validator

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
    # OpenAI's penalties on the tokens generated so far: each logit minus presence_penalty
    # if the token occurred, minus frequency_penalty times its count; before the greedy or
    # sampled choice.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # (token id, bias) added to those logits, as OpenAI's logit_bias.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalized(self) -> bool:
        """Whether the tokens generated so far change the logits (then they are counted)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def adjusted(self) -> bool:
        """Whether the logits are changed at all before the choice."""
        return self.penalized or bool(self.logit_bias)


class ChatParams(Frozen):
    """A chat (`messages`, rendered by the model's chat template) or a raw `prompt` (a text
    completion, tokenized as it is): exactly one of the two."""

    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = Field(default=None, min_length=1)
    sampling: SamplingParams

    @model_validator(mode="after")
    def _one_input(self) -> Self:
        if bool(self.messages) == (self.prompt is not None):
            raise ValueError("a generation takes either messages or a prompt, not both or none")
        return self


FinishReason = Literal["stop", "length", "cancelled", "error"]
