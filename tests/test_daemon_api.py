"""The real daemon through its real API, with the official `openai` client."""

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from openai.types.chat import ChatCompletionMessageParam
from tokenizers import Tokenizer

from tests.conftest import BUILTIN
from tests.daemon import Daemon

pytestmark = pytest.mark.slow


def user(text: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


PROMPT = user("Name three colours.")


def client(daemon: Daemon) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.url}/v1", api_key="unused", timeout=300.0, max_retries=0
    )


def test_models_and_state(daemon: Daemon) -> None:
    ids = [m.id for m in client(daemon).models.list().data]
    assert BUILTIN in ids
    state = daemon.get("/state")
    assert state["node_id"].startswith("node-")
    assert state["last_index"] >= 0
    assert len(state["state_hash"]) == 64


def test_chat_places_the_model_on_demand_and_answers(daemon: Daemon) -> None:
    reply = client(daemon).chat.completions.create(
        model=BUILTIN,
        messages=PROMPT,
        max_tokens=12,
        temperature=0.0,
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 12
    assert reply.usage.prompt_tokens > 0


def _maps_torch(pid: int) -> bool:
    return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()


def test_torch_stays_in_the_runners(daemon: Daemon) -> None:
    # Importing torch costs a start ~4 s and a process ~0.5 GB: the daemon measures and
    # serves without it, and only the runners (the torch engine) load it.
    client(daemon).chat.completions.create(
        model=BUILTIN, messages=PROMPT, max_tokens=2, temperature=0.0
    )
    runners = daemon.runner_pids()
    assert runners and all(_maps_torch(pid) for pid in runners)
    assert daemon.process is not None and not _maps_torch(daemon.process.pid)


def test_streaming_matches_non_streaming_greedy(daemon: Daemon) -> None:
    c = client(daemon)
    whole = c.chat.completions.create(
        model=BUILTIN,
        messages=PROMPT,
        max_tokens=16,
        temperature=0.0,
    )
    parts: list[str] = []
    usage = None
    finish = None
    for chunk in c.chat.completions.create(
        model=BUILTIN,
        messages=PROMPT,
        max_tokens=16,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == (whole.usage.completion_tokens if whole.usage else -1)


def test_text_completions_take_the_raw_prompt(daemon: Daemon) -> None:
    """/v1/completions: the prompt as it is (no chat template: its tokens are the usage's
    prompt tokens), OpenAI's default of 16 tokens, streaming equal to whole, echo, and a
    clear 400 for what it does not do."""
    c = client(daemon)
    prompt = "Once upon a time, in a small village,"
    tokenizer_file = daemon.home / "cache" / "models" / BUILTIN / "tokenizer.json"
    prompt_ids = Tokenizer.from_file(str(tokenizer_file)).encode(prompt).ids
    whole = c.completions.create(model=BUILTIN, prompt=prompt, temperature=0.0)
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.prompt_tokens == len(prompt_ids)
    assert 0 < whole.usage.completion_tokens <= 16
    text = whole.choices[0].text
    assert text.strip()
    parts: list[str] = []
    usage = None
    finish = None
    for chunk in c.completions.create(
        model=BUILTIN,
        prompt=[prompt],
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    ):
        usage = chunk.usage or usage
        for choice in chunk.choices:
            parts.append(choice.text)
            finish = choice.finish_reason or finish
    assert "".join(parts) == text
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    echoed = c.completions.create(model=BUILTIN, prompt=prompt, temperature=0.0, echo=True)
    assert echoed.choices[0].text == prompt + text
    streamed_echo = c.completions.create(
        model=BUILTIN, prompt=prompt, temperature=0.0, echo=True, max_tokens=4, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed_echo if ch.choices).startswith(prompt)
    with pytest.raises(openai.BadRequestError) as caught:
        c.completions.create(model=BUILTIN, prompt=prompt_ids)
    assert caught.value.code == "unsupported_feature" and "Token-id prompts" in str(caught.value)


def test_responses_api_answers_as_chat_does(daemon: Daemon) -> None:
    """/v1/responses: the same greedy text as a chat completion of the same message,
    whole and streamed."""
    c = client(daemon)
    chat = c.chat.completions.create(model=BUILTIN, messages=PROMPT, max_tokens=12, temperature=0.0)
    whole = c.responses.create(
        model=BUILTIN, input="Name three colours.", max_output_tokens=12, temperature=0.0
    )
    assert whole.output_text == chat.choices[0].message.content
    assert whole.usage is not None and chat.usage is not None
    assert whole.usage.input_tokens == chat.usage.prompt_tokens
    assert whole.status == (
        "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    )
    deltas: list[str] = []
    last = None
    for event in c.responses.create(
        model=BUILTIN,
        input="Name three colours.",
        max_output_tokens=12,
        temperature=0.0,
        stream=True,
    ):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        last = event
    assert "".join(deltas) == whole.output_text
    assert last is not None and last.type in ("response.completed", "response.incomplete")


def test_seed_and_stop_are_honoured(daemon: Daemon) -> None:
    c = client(daemon)

    def sample() -> str:
        r = c.chat.completions.create(
            model=BUILTIN,
            messages=PROMPT,
            max_tokens=10,
            temperature=0.9,
            top_p=0.9,
            seed=7,
        )
        return r.choices[0].message.content or ""

    assert sample() == sample()
    full = (
        c.chat.completions.create(
            model=BUILTIN,
            messages=PROMPT,
            max_tokens=24,
            temperature=0.0,
        )
        .choices[0]
        .message.content
        or ""
    )
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    cut = c.chat.completions.create(
        model=BUILTIN,
        messages=PROMPT,
        max_tokens=24,
        temperature=0.0,
        stop=[stop],
    ).choices[0]
    assert cut.finish_reason == "stop"
    assert stop not in (cut.message.content or "")
    assert full.startswith(cut.message.content or "")


def test_penalties_and_logit_bias_change_greedy_output(daemon: Daemon, shared_models: Path) -> None:
    from exo.models.store import ModelStore
    from exo.worker.engines.base import ChatTokenizer

    tokenizer = ChatTokenizer.from_dir(ModelStore(shared_models).ensure(BUILTIN))
    c = client(daemon)
    words = user("Write the word cat ten times.")

    def greedy(
        max_tokens: int = 16,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[str, int] | None = None,
    ) -> str:
        reply = c.chat.completions.create(
            model=BUILTIN,
            messages=words,
            max_tokens=max_tokens,
            temperature=0.0,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            logit_bias=logit_bias,
        )
        return reply.choices[0].message.content or ""

    plain = greedy()
    assert greedy(frequency_penalty=2.0) != plain
    assert greedy(presence_penalty=2.0) != plain
    (cat,) = tokenizer.encode(" cat")
    forced = greedy(max_tokens=3, logit_bias={str(cat): 100})
    assert forced.split() == ["cat", "cat", "cat"], forced
    unknown = httpx.post(
        f"{daemon.url}/v1/chat/completions",
        json={"model": BUILTIN, "messages": words, "logit_bias": {"99999999": 1}},
        timeout=30,
    )
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "logit_bias"


def test_concurrent_requests_all_complete(daemon: Daemon) -> None:
    c = client(daemon)
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            r = c.chat.completions.create(
                model=BUILTIN,
                messages=user(f"Count to {i + 2}."),
                max_tokens=8,
                temperature=0.0,
            )
            results[i] = r.choices[0].message.content or ""
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert sorted(results) == [0, 1, 2, 3]
    assert all(results.values())


def test_bad_inputs_get_openai_shaped_errors(daemon: Daemon) -> None:
    c = client(daemon)
    with pytest.raises(openai.NotFoundError) as not_found:
        c.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert "no-such-model" in str(not_found.value)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model=BUILTIN, messages=PROMPT, temperature=7.5)
    raw = httpx.post(
        f"{daemon.url}/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert raw.status_code == 400
    assert "message" in raw.json()["error"]
    # A prompt of 20 MB (it once reached the log and stopped the node): refused up front.
    with pytest.raises(openai.APIStatusError) as too_large:
        c.chat.completions.create(
            model=BUILTIN, messages=[{"role": "user", "content": "a " * 10_000_000}]
        )
    assert too_large.value.status_code == 413
    # The daemon is unharmed.
    assert (
        client(daemon)
        .chat.completions.create(
            model=BUILTIN,
            messages=PROMPT,
            max_tokens=2,
        )
        .choices
    )


def test_killed_runner_fails_the_request_clearly_and_the_daemon_recovers(daemon: Daemon) -> None:
    daemon.wait_ready(BUILTIN)
    (pid,) = daemon.runner_pids()
    c = client(daemon)
    stream = c.chat.completions.create(
        model=BUILTIN,
        messages=user("Write a long story about a lighthouse."),
        max_tokens=400,
        temperature=0.0,
        stream=True,
    )
    with pytest.raises(openai.APIError) as failure:  # noqa: PT012
        for i, _chunk in enumerate(stream):
            if i == 2:
                psutil.Process(pid).kill()
    assert "runner" in str(failure.value).lower()
    state = daemon.get("/state")["state"]
    assert any(i["failed_reason"] for i in state["instances"].values())
    # The next request re-places the model and succeeds.
    reply = c.chat.completions.create(
        model=BUILTIN,
        messages=PROMPT,
        max_tokens=4,
    )
    assert reply.choices[0].message.content
    assert daemon.runner_pids() != [pid]


def test_events_stream_replays_the_log(daemon: Daemon) -> None:
    last = daemon.get("/state")["last_index"]
    seen: list[int] = []
    with httpx.stream("GET", f"{daemon.url}/events?from=0", timeout=30) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                seen.append(json.loads(line[5:])["index"])
                if seen[-1] >= last:
                    break
    assert seen == list(range(last + 1))


def test_sigterm_stops_runners_and_exits_cleanly(
    tmp_path_factory: pytest.TempPathFactory, shared_models: object
) -> None:
    from pathlib import Path

    assert isinstance(shared_models, Path)
    node = Daemon(tmp_path_factory.mktemp("term"), shared_models).start()
    node.wait_ready(BUILTIN)
    runners = node.runner_pids()
    assert runners
    assert node.stop(signal.SIGTERM) == 0
    time.sleep(0.5)
    assert not [
        p
        for p in runners
        if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    assert "event log closed" in node.output()


def test_placement_preview_covers_every_layer(daemon: Daemon) -> None:
    # The node's device inventory comes with its first telemetry, a moment after start-up.
    deadline = time.monotonic() + 60
    while "stages" not in (body := daemon.get(f"/placement/preview?model={BUILTIN}"))["latency"]:
        assert time.monotonic() < deadline, body
        time.sleep(0.5)
    for objective in ("latency", "throughput"):
        stages = body[objective]["stages"]
        assert stages[0]["start_layer"] == 0
        assert stages[-1]["end_layer"] == 30
        assert body[objective]["prediction"]["tokens_per_s"] > 0
    assert body["baseline"] is not None
    missing = httpx.get(f"{daemon.url}/placement/preview?model=nope", timeout=30)
    assert missing.status_code == 404
    # A context beyond the model's own is the request's fault, for a preview or a placement.
    wide = httpx.get(f"{daemon.url}/placement/preview?model={BUILTIN}&context=9000", timeout=30)
    assert wide.status_code == 400
    assert wide.json()["error"]["param"] == "context"
    placed = httpx.post(
        f"{daemon.url}/instances", json={"model": BUILTIN, "context_length": 9000}, timeout=30
    )
    assert placed.status_code == 400
    assert placed.json()["error"]["message"] == (
        f"context_length 9000 is above the 8192-token context of {BUILTIN}"
    )
