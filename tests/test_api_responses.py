"""The Responses API's pure half: request -> ChatParams, and the response's shapes."""

import json
from typing import Any

import pytest

from exo.api.errors import ApiError
from exo.api.openai_responses import (
    ResponseEvents,
    ResponsesRequest,
    response_object,
    responses_params,
)
from exo.shared.types.chat import ChatMessage, ChatParams
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd
from tests.test_api_translate import CARD, END


def request(**fields: Any) -> ResponsesRequest:
    return ResponsesRequest.model_validate_json(
        json.dumps({"model": CARD.model_id, "input": "hi", **fields})
    )


def params(**fields: Any) -> ChatParams:
    return responses_params(request(**fields), CARD, 1024)


def error(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        params(**fields)
    return caught.value


def test_input_and_instructions_become_the_chat() -> None:
    assert params().messages == (ChatMessage(role="user", content="hi"),)
    chat = params(
        instructions="Be brief.",
        input=[
            {"role": "developer", "content": "Use French."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]},
            {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
            {"role": "user", "content": "c"},
        ],
    )
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "Be brief."),
        ("system", "Use French."),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "c"),
    ]


def test_sampling_takes_max_output_tokens_temperature_and_top_p() -> None:
    sampling = params(max_output_tokens=7, temperature=0.5, top_p=0.9).sampling
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p) == (7, 0.5, 0.9)
    assert params().sampling.max_tokens == 1024
    assert params(top_p=0).sampling.temperature == 0.0  # greedy, as for chat


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id", "unsupported_feature"),
        ({"tools": [{"type": "web_search"}]}, "tools", "unsupported_feature"),
        ({"tool_choice": "auto"}, "tool_choice", "unsupported_feature"),
        ({"reasoning": {"effort": "high"}}, "reasoning", "unsupported_feature"),
        ({"background": True}, "background", "unsupported_feature"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format", "unsupported_feature"),
        (
            {"input": [{"type": "function_call_output", "output": "4"}]},
            "input[0]",
            "unsupported_feature",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "unsupported_feature",
        ),
        ({"input": [{"role": "user"}]}, "input[0]", "invalid_value"),
        ({"input": [{"role": "assistant", "content": "x"}]}, "input", "invalid_value"),
        ({"max_output_tokens": 9000}, "max_output_tokens", "invalid_value"),
    ],
)
def test_what_it_cannot_do_is_a_clear_400(fields: dict[str, Any], param: str, code: str) -> None:
    err = error(**fields)
    assert (err.status, err.code, err.param) == (400, code, param)


def test_a_finished_response_says_how_it_ended() -> None:
    asked = request(metadata={"k": "v"}, instructions="Be brief.")
    p = responses_params(asked, CARD, 1024)
    done = response_object(TaskId("chatcmpl-abc"), asked, p, "m", 5, "Hello", END)
    body = done.model_dump(mode="json")
    assert (body["id"], body["object"], body["status"]) == ("resp_abc", "response", "incomplete")
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"] == [
        {
            "type": "message",
            "id": "msg_abc",
            "status": "incomplete",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}
            ],
        }
    ]
    assert body["usage"]["total_tokens"] == 15 and body["metadata"] == {"k": "v"}
    assert body["instructions"] == "Be brief."
    stopped = END.model_copy(update={"finish_reason": "stop"})
    complete = response_object(TaskId("chatcmpl-abc"), asked, p, "m", 5, "Hello", stopped)
    assert (complete.status, complete.incomplete_details) == ("completed", None)
    begun = response_object(TaskId("chatcmpl-abc"), asked, p, "m", 5, None, None)
    assert (begun.status, begun.output, begun.usage) == ("in_progress", (), None)


def test_streamed_events_are_numbered_and_typed_frames() -> None:
    asked = request(stream=True)
    events = ResponseEvents(TaskId("chatcmpl-abc"), asked, params(), "m", 5)
    data = (
        events.opening("He")
        + events.piece("llo")
        + events.closing(StreamEnd.model_validate({**END.model_dump(), "finish_reason": "stop"}))
    )
    frames = [f for f in data.decode().split("\n\n") if f]
    names = [f.split("\n")[0].removeprefix("event: ") for f in frames]
    bodies = [json.loads(f.split("\n")[1].removeprefix("data: ")) for f in frames]
    assert names == [b["type"] for b in bodies]
    assert [b["sequence_number"] for b in bodies] == list(range(len(bodies)))
    assert names[-1] == "response.completed"
    assert [b["delta"] for b in bodies if b["type"] == "response.output_text.delta"] == [
        "He",
        "llo",
    ]
    assert bodies[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert events.opening("").count(b"event: ") == 4  # nothing generated: no delta
