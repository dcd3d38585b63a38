"""The OpenAI wire shapes: lenient request models in, frozen response models out.

Requests come from many clients, so unknown fields are ignored (and the known-but-unsupported
ones rejected by `translate`), ints are accepted where floats are expected, but nothing else
is coerced: no "0.5" strings for numbers, no booleans for ints.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from exo.shared.types.base import Frozen


class LenientRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class ContentPart(LenientRequest):
    """One part of a list-valued message content; only "text" parts are served."""

    type: StrictStr
    text: StrictStr | None = None


class RequestMessage(LenientRequest):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None


class StreamOptions(LenientRequest):
    include_usage: StrictBool = False


class ResponseFormat(LenientRequest):
    type: StrictStr


StopString = Annotated[StrictStr, Field(min_length=1)]


class SamplingRequest(LenientRequest):
    """What chat and text completion requests share: the model and how to sample."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    seed: StrictInt | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=4)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    # Token id (as a string, as in OpenAI's API) -> bias; ids are checked against the model.
    logit_bias: (
        Annotated[
            dict[StrictStr, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]],
            Field(max_length=1024),
        ]
        | None
    ) = None
    # Accepted (OpenAI's clients send it); it changes nothing.
    user: StrictStr | None = None

    @property
    def include_usage(self) -> bool:
        """Whether a streamed reply ends with a chunk of usage."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[RequestMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    # Known, unsupported: rejected with a clear 400 by `translate` when set.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: ResponseFormat | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None


class CompletionRequest(SamplingRequest):
    """OpenAI's (legacy) text completion: a raw prompt, no chat template."""

    # One text (or a list holding one); token-id prompts and batches are rejected by
    # `translate` with a clear 400.
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool = False
    # Known, unsupported: rejected with a clear 400 by `translate` when set.
    suffix: StrictStr | None = None
    logprobs: StrictInt | None = None
    best_of: StrictInt | None = None


class PinnedStageRequest(LenientRequest):
    """One stage of a manual split; the master validates the split as a whole."""

    node_id: StrictStr
    device: StrictStr = "cpu"
    engine: StrictStr
    start_layer: StrictInt
    end_layer: StrictInt


class PlaceInstanceRequest(LenientRequest):
    model: StrictStr
    node_id: StrictStr | None = None
    engine: Literal["mlx", "torch"] | None = None
    # A manual split in pipeline order; always places a new instance.
    stages: list[PinnedStageRequest] | None = Field(default=None, min_length=1)
    # Solver options (ignored with `stages`): objective, KV context, node/device filters.
    objective: Literal["latency", "throughput"] | None = None
    context_length: StrictInt | None = Field(default=None, gt=0)
    include_nodes: list[StrictStr] | None = Field(default=None, max_length=256)
    exclude_nodes: list[StrictStr] = Field(default_factory=list[StrictStr], max_length=256)
    include_devices: list[StrictStr] | None = Field(default=None, max_length=1024)
    exclude_devices: list[StrictStr] = Field(default_factory=list[StrictStr], max_length=1024)


class AddModelRequest(LenientRequest):
    """A Hugging Face hub repository to serve: `owner/name`, at a branch, tag or commit."""

    repo: StrictStr = Field(min_length=3, max_length=200)
    revision: StrictStr = Field(default="main", min_length=1, max_length=200)


# --- responses -------------------------------------------------------------------------

OpenAIFinishReason = Literal["stop", "length"]


def _is_none(value: object) -> bool:
    return value is None


class Usage(Frozen):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Timings(Frozen):
    """exo's own figures for one completion (an extension; OpenAI clients ignore it)."""

    time_to_first_token_ms: float
    decode_tokens_per_s: float


class ChunkDelta(Frozen):
    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)


class ChunkChoice(Frozen):
    index: int = 0
    delta: ChunkDelta
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None = None


class ChatCompletionChunk(Frozen):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[ChunkChoice, ...]
    # Serialised only when the client asked for stream_options.include_usage.
    usage: Usage | None = None
    timings: Timings | None = Field(default=None, exclude_if=_is_none)


class AssistantMessage(Frozen):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class CompletionChoice(Frozen):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: OpenAIFinishReason


class ChatCompletion(Frozen):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[CompletionChoice, ...]
    usage: Usage
    timings: Timings


class TextChoice(Frozen):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: OpenAIFinishReason | None


class TextCompletion(Frozen):
    """A text completion, whole or (`choices` holding a piece of text) one streamed chunk;
    OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: tuple[TextChoice, ...]
    # Whole: always. Streamed: on the last chunk, when stream_options.include_usage.
    usage: Usage | None = None
    timings: Timings | None = Field(default=None, exclude_if=_is_none)


class ModelObject(Frozen):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "exo"
    # Extensions: what the dashboard and scripts want to know without a second call.
    display_name: str
    context_length: int
    n_layers: int
    dtype: str


class ModelList(Frozen):
    object: Literal["list"] = "list"
    data: tuple[ModelObject, ...]
