"""Pure translation between the OpenAI wire shapes and exo's types: no I/O, no clock.

Defaults (documented in docs/api.md):
- max_tokens: `max_completion_tokens`, else `max_tokens`, else min(1024, context length)
  (a text completion: `max_tokens`, else 16, as OpenAI's); a request above the model's
  context length is a 400.
- temperature 1.0 and top_p 1.0 (OpenAI's defaults); top_p 0 means greedy (temperature 0).
- seed: any integer, reduced modulo 2**63 so that every engine accepts it.
"""

from collections.abc import Sequence
from typing import Protocol

from exo.api.errors import ApiError, above_context
from exo.api.openai_types import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    ModelList,
    ModelObject,
    OpenAIFinishReason,
    RequestMessage,
    SamplingRequest,
    TextChoice,
    TextCompletion,
    Timings,
    Usage,
)
from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatMessage, ChatParams, FinishReason, SamplingParams
from exo.shared.types.models import ModelCard
from exo.shared.types.stream import StreamEnd

DEFAULT_MAX_TOKENS = 1024
# OpenAI's default for a text completion without max_tokens (clients of that API expect it).
COMPLETION_DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
SEED_MODULUS = 2**63

SSE_DONE = b"data: [DONE]\n\n"


def reply_id(prefix: str, task_id: str) -> str:
    """An OpenAI-style id for what answers a task (`cmpl-`, `resp_`, ...): the task's own
    random part behind the kind's prefix."""
    return prefix + task_id.removeprefix("chatcmpl-")


def unsupported(message: str, param: str) -> ApiError:
    return ApiError(400, message, code="unsupported_feature", param=param)


def chat_params(
    request: ChatCompletionRequest,
    card: ModelCard,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> ChatParams:
    """The control-plane request for an OpenAI chat request (raises ApiError 400)."""
    _reject_unsupported(request)
    messages = tuple(_message(m, i) for i, m in enumerate(request.messages))
    if request.max_completion_tokens:
        requested = (request.max_completion_tokens, "max_completion_tokens")
    else:
        requested = (request.max_tokens, "max_tokens")
    sampling = sampling_for(request, requested, card, default_max_tokens)
    return ChatParams(messages=messages, sampling=sampling)


def completion_params(request: CompletionRequest, card: ModelCard) -> ChatParams:
    """The control-plane request for an OpenAI text completion (raises ApiError 400)."""
    _reject_shared_unsupported(request)
    prompt = request.prompt
    if isinstance(prompt, list):
        if any(not isinstance(p, str) for p in prompt):
            raise unsupported("Token-id prompts are not supported; send the text.", "prompt")
        if len(prompt) != 1:
            raise unsupported("Only one prompt per request is supported.", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "prompt must not be empty.", code="invalid_value", param="prompt")
    if request.suffix:
        raise unsupported("suffix (insertion) is not supported.", "suffix")
    if request.logprobs is not None:
        raise unsupported("logprobs are not supported.", "logprobs")
    if request.best_of not in (None, 1):
        raise unsupported("Only best_of=1 is supported.", "best_of")
    requested = (request.max_tokens, "max_tokens")
    sampling = sampling_for(request, requested, card, COMPLETION_DEFAULT_MAX_TOKENS)
    return ChatParams(prompt=prompt, sampling=sampling)


def _reject_shared_unsupported(request: SamplingRequest) -> None:
    if request.n is not None and request.n != 1:
        raise unsupported("Only n=1 is supported.", "n")


def _reject_unsupported(request: ChatCompletionRequest) -> None:
    _reject_shared_unsupported(request)
    if request.tools or request.functions:
        param = "tools" if request.tools else "functions"
        raise unsupported("Tool and function calling are not supported by exo.", param)
    if request.tool_choice not in (None, "none"):
        raise unsupported("Tool and function calling are not supported by exo.", "tool_choice")
    if request.function_call not in (None, "none"):
        raise unsupported("Tool and function calling are not supported by exo.", "function_call")
    if request.response_format is not None and request.response_format.type != "text":
        raise unsupported(
            f"response_format '{request.response_format.type}' is not supported; only 'text' is.",
            "response_format",
        )
    if request.logprobs or request.top_logprobs:
        raise unsupported("logprobs are not supported.", "logprobs")


def _message(message: RequestMessage, index: int) -> ChatMessage:
    param = f"messages[{index}]"
    if message.role in ("tool", "function") or message.tool_calls or message.function_call:
        raise unsupported(
            "Tool and function calling are not supported by exo "
            f"({param} is a {message.role} message or carries tool calls).",
            param,
        )
    role = "system" if message.role == "developer" else message.role
    content = message.content
    if content is None:
        if role != "assistant":
            raise ApiError(
                400,
                f"{param}.content is required for {role} messages.",
                code="invalid_value",
                param=f"{param}.content",
            )
        return ChatMessage(role=role, content="")
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        if part.type in ("image_url", "input_image", "image"):
            raise unsupported("Image inputs are not supported by exo's models.", part_param)
        if part.type in ("input_audio", "audio"):
            raise unsupported("Audio inputs are not supported by exo's models.", part_param)
        if part.type != "text":
            raise unsupported(
                f"Content part type '{part.type}' is not supported; only 'text' is.", part_param
            )
        if part.text is None:
            raise ApiError(
                400,
                f"{part_param}.text is required for text parts.",
                code="invalid_value",
                param=f"{part_param}.text",
            )
        texts.append(part.text)
    return ChatMessage(role=role, content="\n".join(texts))


def sampling_for(
    request: SamplingRequest,
    max_tokens_asked: tuple[int | None, str],
    card: ModelCard,
    default_max_tokens: int,
) -> SamplingParams:
    requested, param = max_tokens_asked
    if requested is not None and requested > card.context_length:
        raise above_context(param, requested, card.model_id, card.context_length)
    max_tokens = requested or min(default_max_tokens, card.context_length)
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else request.temperature
    top_p = DEFAULT_TOP_P if request.top_p is None else request.top_p
    if top_p == 0.0:  # the limit of nucleus sampling as p -> 0 is the argmax token
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        seed=None if request.seed is None else request.seed % SEED_MODULUS,
        stop=_stops(request.stop),
        presence_penalty=float(request.presence_penalty or 0.0),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        logit_bias=_logit_bias(request.logit_bias, card),
    )


def _logit_bias(bias: dict[str, float] | None, card: ModelCard) -> tuple[tuple[int, float], ...]:
    pairs: list[tuple[int, float]] = []
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit()) or int(key) >= card.vocab_size:
            raise ApiError(
                400,
                f"logit_bias has '{key}', which is not a token id of {card.model_id} "
                f"(0 to {card.vocab_size - 1}).",
                code="invalid_value",
                param="logit_bias",
            )
        if value != 0.0:
            pairs.append((int(key), float(value)))
    return tuple(sorted(pairs))


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    return tuple(dict.fromkeys(stop))  # de-duplicated, order kept


# --- responses -------------------------------------------------------------------------


def openai_finish_reason(reason: FinishReason) -> OpenAIFinishReason:
    """exo's finish reasons that complete a response; "cancelled"/"error" are errors instead."""
    if reason == "length":
        return "length"
    return "stop"


def usage(end: StreamEnd) -> Usage:
    return Usage(
        prompt_tokens=end.prompt_tokens,
        completion_tokens=end.completion_tokens,
        total_tokens=end.prompt_tokens + end.completion_tokens,
    )


def timings(end: StreamEnd) -> Timings:
    return Timings(
        time_to_first_token_ms=end.time_to_first_token_ms,
        decode_tokens_per_s=end.decode_tokens_per_s,
    )


def chat_completion(
    completion_id: str, model: str, created: int, text: str, end: StreamEnd
) -> ChatCompletion:
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=(
            CompletionChoice(
                message=AssistantMessage(content=text),
                finish_reason=openai_finish_reason(end.finish_reason),
            ),
        ),
        usage=usage(end),
        timings=timings(end),
    )


class ChunkBuilder(Frozen):
    """The chunks of one streamed completion; all share id, created and model."""

    completion_id: str
    model: str
    created: int
    include_usage: bool = False

    def _chunk(
        self, delta: ChunkDelta, finish_reason: OpenAIFinishReason | None = None
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=(ChunkChoice(delta=delta, finish_reason=finish_reason),),
        )

    def role(self) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(role="assistant", content=""))

    def content(self, text: str) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(content=text))

    def finish(self, end: StreamEnd) -> ChatCompletionChunk:
        return self._chunk(ChunkDelta(), openai_finish_reason(end.finish_reason))

    def usage(self, end: StreamEnd) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=(),
            usage=usage(end),
            timings=timings(end),
        )

    def sse(self, chunk: ChatCompletionChunk) -> bytes:
        """`data: {chunk}` with `"usage": null` on every chunk only when usage was asked for."""
        exclude = None if self.include_usage else {"usage"}
        return sse_data(chunk.model_dump_json(exclude=exclude))

    # StreamChunks

    def opening(self, text: str) -> bytes:
        role = self.sse(self.role())
        return role + self.sse(self.content(text)) if text else role

    def piece(self, text: str) -> bytes:
        return self.sse(self.content(text))

    def closing(self, end: StreamEnd) -> bytes:
        usage = self.sse(self.usage(end)) if self.include_usage else b""
        return self.sse(self.finish(end)) + usage + SSE_DONE


def text_completion(
    completion_id: str, model: str, created: int, text: str, end: StreamEnd
) -> TextCompletion:
    return TextCompletion(
        id=completion_id,
        created=created,
        model=model,
        choices=(TextChoice(text=text, finish_reason=openai_finish_reason(end.finish_reason)),),
        usage=usage(end),
        timings=timings(end),
    )


class TextChunkBuilder(Frozen):
    """The chunks of one streamed text completion: text pieces (the first one after the
    prompt, with `echo`), then the finish reason, then (when asked for) the usage, on a
    chunk of no choices, as for chat."""

    completion_id: str
    model: str
    created: int
    include_usage: bool = False
    echo: str = ""

    def _chunk(self, choices: tuple[TextChoice, ...], end: StreamEnd | None = None) -> bytes:
        chunk = TextCompletion(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=None if end is None else usage(end),
            timings=None if end is None else timings(end),
        )
        exclude = None if self.include_usage else {"usage"}
        return sse_data(chunk.model_dump_json(exclude=exclude))

    def content(self, text: str) -> bytes:
        return self._chunk((TextChoice(text=text, finish_reason=None),))

    def finish(self, end: StreamEnd) -> bytes:
        return self._chunk(
            (TextChoice(text="", finish_reason=openai_finish_reason(end.finish_reason)),)
        )

    def usage(self, end: StreamEnd) -> bytes:
        return self._chunk((), end)

    # StreamChunks

    def opening(self, text: str) -> bytes:
        return self.content(self.echo + text) if self.echo or text else b""

    def piece(self, text: str) -> bytes:
        return self.content(text)

    def closing(self, end: StreamEnd) -> bytes:
        usage = self.usage(end) if self.include_usage else b""
        return self.finish(end) + usage + SSE_DONE


class StreamChunks(Protocol):
    """What a streamed completion (chat or text) sends, as SSE bytes."""

    def opening(self, text: str) -> bytes:
        """Before and with the first generated text ("" when there is none)."""
        ...

    def piece(self, text: str) -> bytes:
        """Each later text."""
        ...

    def closing(self, end: StreamEnd) -> bytes:
        """The finish reason, the usage when asked for, and `[DONE]`."""
        ...


def sse_data(payload: str, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    body = "".join(f"data: {line}\n" for line in payload.split("\n"))
    return f"{head}{body}\n".encode()


def sse_comment(text: str) -> bytes:
    return "".join(f": {line}\n" for line in text.split("\n")).encode() + b"\n"


def model_object(card: ModelCard) -> ModelObject:
    return ModelObject(
        id=card.model_id,
        display_name=card.display_name,
        context_length=card.context_length,
        n_layers=card.n_layers,
        dtype=card.dtype,
    )


def model_list(cards: Sequence[ModelCard]) -> ModelList:
    return ModelList(data=tuple(model_object(c) for c in sorted(cards, key=lambda c: c.model_id)))
