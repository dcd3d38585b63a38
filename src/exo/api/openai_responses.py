"""OpenAI's Responses API (`POST /v1/responses`), text in and text out: its wire shapes and
their pure translation to and from exo's types. Stateless: nothing is stored, so
`previous_response_id` is refused, as are tools, images and files.

A streamed response is OpenAI's sequence of typed events, each an SSE frame with its
`event:` line: `response.created`, `response.in_progress`, `response.output_item.added`,
`response.content_part.added`, `response.output_text.delta` per piece of text, then
`response.output_text.done`, `response.content_part.done`, `response.output_item.done` and
`response.completed` (or `response.incomplete` when `max_output_tokens` ran out).
"""

import json
from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictFloat, StrictInt, StrictStr

from exo.api.errors import ApiError
from exo.api.openai_types import ContentPart, LenientRequest, SamplingRequest, Timings
from exo.api.translate import reply_id, sampling_for, timings, unsupported
from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatMessage, ChatParams
from exo.shared.types.models import ModelCard
from exo.shared.types.stream import StreamEnd

# --- request ---------------------------------------------------------------------------


class InputItem(LenientRequest):
    """One message of `input`; other item kinds (tool calls and outputs, reasoning,
    references) are refused."""

    type: StrictStr = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: StrictStr | list[ContentPart] | None = None


class TextFormat(LenientRequest):
    type: StrictStr


class TextConfig(LenientRequest):
    format: TextFormat | None = None


class ResponsesRequest(LenientRequest):
    model: StrictStr
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0, allow_inf_nan=False)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)] | None = None
    stream: StrictBool = False
    # Accepted; nothing is stored either way, and `metadata` comes back as it was sent.
    store: StrictBool | None = None
    metadata: Annotated[dict[StrictStr, StrictStr], Field(max_length=16)] | None = None
    user: StrictStr | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    # Known, unsupported: a clear 400 when set.
    previous_response_id: StrictStr | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    reasoning: Any = None
    background: StrictBool | None = None
    top_logprobs: StrictInt | None = None


# --- response --------------------------------------------------------------------------

Status = Literal["in_progress", "completed", "incomplete"]


class OutputText(Frozen):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: tuple[()] = ()
    logprobs: tuple[()] = ()


class OutputMessage(Frozen):
    type: Literal["message"] = "message"
    id: str
    status: Status
    role: Literal["assistant"] = "assistant"
    content: tuple[OutputText, ...]


class InputTokensDetails(Frozen):
    cached_tokens: int = 0


class OutputTokensDetails(Frozen):
    reasoning_tokens: int = 0


class ResponseUsage(Frozen):
    input_tokens: int
    input_tokens_details: InputTokensDetails = InputTokensDetails()
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int


class IncompleteDetails(Frozen):
    reason: Literal["max_output_tokens"] = "max_output_tokens"


class ResponseObject(Frozen):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Status
    model: str
    output: tuple[OutputMessage, ...]
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float
    top_p: float
    parallel_tool_calls: bool = False
    tool_choice: Literal["none"] = "none"
    tools: tuple[()] = ()
    store: bool = False
    metadata: dict[str, str] = Field(default_factory=dict[str, str])
    timings: Timings | None = None


# --- translation -----------------------------------------------------------------------


def responses_params(
    request: ResponsesRequest, card: ModelCard, default_max_tokens: int
) -> ChatParams:
    """The control-plane request for a Responses API request (raises ApiError 400)."""
    for name, value in (
        ("previous_response_id", request.previous_response_id),
        ("tools", request.tools or None),
        ("reasoning", request.reasoning),
        ("background", request.background or None),
        ("top_logprobs", request.top_logprobs or None),
    ):
        if value is not None:
            raise unsupported(f"{name} is not supported by exo's Responses API.", name)
    if request.tool_choice not in (None, "none"):
        raise unsupported("Tool calling is not supported by exo.", "tool_choice")
    text_format = request.text.format if request.text is not None else None
    if text_format is not None and text_format.type != "text":
        raise unsupported(
            f"text.format '{text_format.type}' is not supported; only 'text' is.", "text.format"
        )
    messages: list[ChatMessage] = []
    if request.instructions:
        messages.append(ChatMessage(role="system", content=request.instructions))
    if isinstance(request.input, str):
        messages.append(ChatMessage(role="user", content=request.input))
    else:
        messages.extend(_message(item, i) for i, item in enumerate(request.input))
    if not any(m.role == "user" for m in messages):
        raise ApiError(400, "input holds no user message.", code="invalid_value", param="input")
    sampling_request = SamplingRequest(
        model=request.model, temperature=request.temperature, top_p=request.top_p
    )
    sampling = sampling_for(
        sampling_request,
        (request.max_output_tokens, "max_output_tokens"),
        card,
        default_max_tokens,
    )
    return ChatParams(messages=tuple(messages), sampling=sampling)


def _message(item: InputItem, index: int) -> ChatMessage:
    param = f"input[{index}]"
    if item.type != "message" or item.role is None:
        raise unsupported(
            f"{param} is a '{item.type}' item; only messages (with a role) are supported.", param
        )
    role = "system" if item.role == "developer" else item.role
    content = item.content
    if content is None:
        raise ApiError(400, f"{param}.content is required.", code="invalid_value", param=param)
    if isinstance(content, str):
        return ChatMessage(role=role, content=content)
    texts: list[str] = []
    for j, part in enumerate(content):
        part_param = f"{param}.content[{j}]"
        if part.type not in ("input_text", "output_text", "text"):
            raise unsupported(
                f"Content part type '{part.type}' is not supported; only text is.", part_param
            )
        if part.text is None:
            raise ApiError(
                400, f"{part_param}.text is required.", code="invalid_value", param=part_param
            )
        texts.append(part.text)
    return ChatMessage(role=role, content="\n".join(texts))


def _message_id(task_id: str) -> str:
    return reply_id("msg_", task_id)


def response_object(
    task_id: str,
    request: ResponsesRequest,
    params: ChatParams,
    model: str,
    created_at: int,
    text: str | None,
    end: StreamEnd | None,
) -> ResponseObject:
    """The response as a whole: in progress (`text` None: nothing generated yet), or done."""
    status: Status = "in_progress"
    if end is not None:
        status = "incomplete" if end.finish_reason == "length" else "completed"
    output = ()
    if text is not None:
        message_status: Status = "in_progress" if end is None else status
        output = (
            OutputMessage(
                id=_message_id(task_id), status=message_status, content=(OutputText(text=text),)
            ),
        )
    return ResponseObject(
        id=reply_id("resp_", task_id),
        created_at=created_at,
        status=status,
        model=model,
        output=output,
        usage=None
        if end is None
        else ResponseUsage(
            input_tokens=end.prompt_tokens,
            output_tokens=end.completion_tokens,
            total_tokens=end.prompt_tokens + end.completion_tokens,
        ),
        incomplete_details=IncompleteDetails() if status == "incomplete" else None,
        instructions=request.instructions,
        max_output_tokens=request.max_output_tokens,
        temperature=params.sampling.temperature,
        top_p=params.sampling.top_p,
        metadata=request.metadata or {},
        timings=None if end is None else timings(end),
    )


class ResponseEvents:
    """The SSE events of one streamed response (a `StreamChunks`): numbered in order, and
    holding the text so far for the `done` events."""

    def __init__(
        self,
        task_id: str,
        request: ResponsesRequest,
        params: ChatParams,
        model: str,
        created_at: int,
    ) -> None:
        self._task_id = task_id
        self._request = request
        self._params = params
        self._model = model
        self._created_at = created_at
        self._sequence = 0
        self._text: list[str] = []

    def _event(self, kind: str, **fields: object) -> bytes:
        body = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return f"event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n".encode()

    def _response(self, text: str | None, end: StreamEnd | None) -> dict[str, Any]:
        response = response_object(
            self._task_id, self._request, self._params, self._model, self._created_at, text, end
        )
        return response.model_dump(mode="json")

    def _where(self) -> dict[str, object]:
        return {"item_id": _message_id(self._task_id), "output_index": 0, "content_index": 0}

    def opening(self, text: str) -> bytes:
        empty = OutputText(text="").model_dump(mode="json")
        item = OutputMessage(id=_message_id(self._task_id), status="in_progress", content=())
        return (
            self._event("response.created", response=self._response(None, None))
            + self._event("response.in_progress", response=self._response(None, None))
            + self._event(
                "response.output_item.added", output_index=0, item=item.model_dump(mode="json")
            )
            + self._event("response.content_part.added", **self._where(), part=empty)
            + (self.piece(text) if text else b"")
        )

    def piece(self, text: str) -> bytes:
        self._text.append(text)
        return self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])

    def closing(self, end: StreamEnd) -> bytes:
        text = "".join(self._text)
        done = self._response(text, end)
        part = OutputText(text=text).model_dump(mode="json")
        final = "response.incomplete" if done["status"] == "incomplete" else "response.completed"
        return (
            self._event("response.output_text.done", **self._where(), text=text, logprobs=[])
            + self._event("response.content_part.done", **self._where(), part=part)
            + self._event("response.output_item.done", output_index=0, item=done["output"][0])
            + self._event(final, response=done)
        )
