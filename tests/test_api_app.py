"""The HTTP API in-process, against `ScriptedBackend`.

`ScriptedBackend` is an in-memory stand-in for the node, for API-shape tests only: it folds
events with the real `apply`, answers commands the way the master would, and plays scripted
runner load progress and token streams. Behaviour of the real daemon (master, runners,
engines) is tested with the openai client against running nodes elsewhere.
"""

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import openai
import pytest
from anyio.abc import ObjectReceiveStream, TaskGroup
from anyio.streams.memory import MemoryObjectSendStream
from fastapi import FastAPI
from openai.types.responses import Response, ResponseOutputMessage
from openai.types.responses.response import IncompleteDetails

from exo.api.app import create_app
from exo.api.settings import ApiSettings
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.models.describe import UnsupportedModel
from exo.models.download import GrowingFile
from exo.models.hub import HubDenied, HubError, HubNotFound
from exo.models.store import ModelStore
from exo.shared.apply import apply
from exo.shared.types.cluster import ClusterStatus
from exo.shared.types.commands import (
    AddModel,
    CancelTask,
    Command,
    CommandAccepted,
    CommandRejected,
    CommandReply,
    CreateTask,
    DeleteInstance,
    PlaceInstance,
    RejectionCode,
    RemoveModel,
)
from exo.shared.types.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    ModelAdded,
    ModelRemoved,
    RunnerStatusChanged,
    TaskCancelled,
    TaskCreated,
    TaskFailed,
    TaskFinished,
    TaskStarted,
)
from exo.shared.types.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, ShardAssignment
from exo.shared.types.models import ModelCard
from exo.shared.types.runners import (
    SERVING_RUNNER_KINDS,
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerStatus,
)
from exo.shared.types.state import State
from exo.shared.types.stream import StreamEnd, StreamError, StreamMessage, TokenChunk
from exo.shared.types.tasks import Task

pytestmark = pytest.mark.anyio

MODEL = ModelId("smollm2-135m")
CARD = SMOLLM2_135M_INSTRUCT.model_copy(update={"model_id": MODEL})
FAST = ApiSettings(
    command_timeout_s=2.0,
    load_timeout_s=5.0,
    stall_timeout_s=1.0,
    result_grace_s=0.5,
    generation_timeout_s=10.0,
    keepalive_interval_s=0.05,
    events_keepalive_s=0.05,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# A scripted generation: stream messages to send, floats are pauses in seconds.
Step = StreamMessage | float
Script = Callable[[TaskId], Sequence[Step]]


def tokens(*texts: str, finish: str = "stop", pause: float = 0.0) -> Script:
    def script(task_id: TaskId) -> list[Step]:
        steps: list[Step] = []
        for i, text in enumerate(texts):
            if pause:
                steps.append(pause)
            steps.append(TokenChunk(task_id=task_id, text=text, token_id=i))
        steps.append(
            StreamEnd.model_validate(
                {
                    "task_id": task_id,
                    "finish_reason": finish,
                    "prompt_tokens": 9,
                    "completion_tokens": len(texts),
                    "time_to_first_token_ms": 12.5,
                    "decode_tokens_per_s": 40.0,
                }
            )
        )
        return steps

    return script


@dataclass
class ScriptedBackend:
    """In-memory stand-in for the node (see the module docstring): only for API-shape tests."""

    cards: list[ModelCard] = field(default_factory=lambda: [CARD])
    # Runner statuses played after a PlaceInstance, each after `load_step_s`.
    load_script: list[RunnerStatus] = field(
        default_factory=lambda: [RunnerLoading(progress=0.5), RunnerReady()]
    )
    load_step_s: float = 0.0
    # How long a created task stays pending (queued behind others) before it starts.
    queue_delay_s: float = 0.0
    script: Script = field(default_factory=lambda: tokens("Hello", ",", " world"))
    # Command kind -> rejection to answer it with.
    reject: dict[str, tuple[RejectionCode, str]] = field(
        default_factory=dict[str, tuple[RejectionCode, str]]
    )
    # Like `reject`, for the first such command only.
    reject_once: dict[str, tuple[RejectionCode, str]] = field(
        default_factory=dict[str, tuple[RejectionCode, str]]
    )
    silent_master: bool = False
    # What the hub holds: repo -> its card, or the error reading it raises.
    hub: dict[str, ModelCard | Exception] = field(default_factory=dict[str, ModelCard | Exception])
    # The node's model store, whose hub downloads the API serves to peers.
    store: ModelStore | None = None
    commands: list[Command] = field(default_factory=list[Command])
    events: list[IndexedEvent] = field(default_factory=list[IndexedEvent])
    _state: State = field(default_factory=State)
    _tg: TaskGroup | None = None
    _changed: anyio.Event | None = None
    _streams: dict[TaskId, MemoryObjectSendStream[StreamMessage]] = field(
        default_factory=dict[TaskId, MemoryObjectSendStream[StreamMessage]]
    )
    _event_subscribers: list[MemoryObjectSendStream[IndexedEvent]] = field(
        default_factory=list[MemoryObjectSendStream[IndexedEvent]]
    )
    _next_id: int = 0
    close_events_after: float | None = None
    app: FastAPI | None = None

    # --- ApiBackend ---------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return NodeId("node-a")

    def state(self) -> State:
        return self._state

    def cluster_status(self) -> ClusterStatus:
        return ClusterStatus(
            node_id=self.node_id,
            cluster="c1",
            role="leader",
            term=self._state.term,
            master=self.node_id,
            commit=self._state.last_index,
            log_last_index=self._state.last_index,
            voters={self.node_id: 0},
            connected={},
        )

    def model_cards(self) -> Sequence[ModelCard]:
        return self.cards

    def model_card(self, model_id: ModelId) -> ModelCard | None:
        return next((c for c in self.cards if c.model_id == model_id), None)

    def model_file(self, repo: str, commit: str, path: str) -> Path | None:
        return None if self.store is None else self.store.served_file(repo, commit, path)

    def model_part(self, repo: str, commit: str, path: str) -> GrowingFile | None:
        return None if self.store is None else self.store.served_part(repo, commit, path)

    def model_listing(self, repo: str, commit: str) -> bytes | None:
        return None if self.store is None else self.store.served_listing(repo, commit)

    async def describe_hub_model(self, repo: str, revision: str) -> ModelCard:
        found = self.hub.get(repo, HubNotFound(f"{repo}@{revision}: not found on the hub"))
        if isinstance(found, Exception):
            raise found
        return found

    async def send_command(self, command: Command) -> CommandReply:
        self.commands.append(command)
        if self.silent_master:
            await anyio.sleep_forever()
        command_id = CommandId(f"cmd-{len(self.commands)}")
        if command.kind in self.reject:
            code, message = self.reject[command.kind]
            return CommandRejected(command_id=command_id, code=code, message=message)
        if command.kind in self.reject_once:
            code, message = self.reject_once.pop(command.kind)
            return CommandRejected(command_id=command_id, code=code, message=message)
        match command:
            case PlaceInstance():
                return self._place(command_id, command)
            case CreateTask():
                return self._create_task(command_id, command)
            case CancelTask(task_id=task_id, reason=reason):
                if task_id not in self._state.tasks:
                    return CommandRejected(
                        command_id=command_id, code="not_found", message="no task"
                    )
                return self._accepted(
                    command_id, None, TaskCancelled(task_id=task_id, reason=reason)
                )
            case AddModel(card=card):
                self.cards = [c for c in self.cards if c.model_id != card.model_id] + [card]
                return self._accepted(command_id, card.model_id, ModelAdded(card=card))
            case RemoveModel(model_id=model_id):
                self.cards = [c for c in self.cards if c.model_id != model_id]
                return self._accepted(command_id, model_id, ModelRemoved(model_id=model_id))
            case DeleteInstance(instance_id=instance_id):
                if instance_id not in self._state.instances:
                    return CommandRejected(
                        command_id=command_id,
                        code="not_found",
                        message=f"no instance {instance_id}",
                    )
                return self._accepted(
                    command_id, None, InstanceDeleted(instance_id=instance_id, reason="api")
                )

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        with anyio.fail_after(timeout_s):
            while not predicate(self._state):
                await self._changed_event().wait()
        return self._state

    @asynccontextmanager
    async def subscribe_stream(
        self, task_id: TaskId
    ) -> AsyncGenerator[ObjectReceiveStream[StreamMessage]]:
        send, receive = anyio.create_memory_object_stream[StreamMessage](100)
        self._streams[task_id] = send
        try:
            with receive:
                yield receive
        finally:
            self._streams.pop(task_id, None)
            send.close()

    @asynccontextmanager
    async def subscribe_events(
        self, from_index: int
    ) -> AsyncGenerator[ObjectReceiveStream[IndexedEvent]]:
        send, receive = anyio.create_memory_object_stream[IndexedEvent](1000)
        for event in self.events[from_index:]:
            send.send_nowait(event)
        if self.close_events_after is not None:
            tg = self._task_group()

            async def close_later(delay: float = self.close_events_after) -> None:
                await anyio.sleep(delay)
                send.close()

            tg.start_soon(close_later)
        self._event_subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            self._event_subscribers.remove(send)
            send.close()

    # --- the scripted cluster -------------------------------------------------------------

    def emit(self, event: Event) -> int:
        indexed = IndexedEvent(
            index=len(self.events),
            term=1,
            origin="script",
            origin_seq=len(self.events),
            event=event,
        )
        self.events.append(indexed)
        self._state = apply(self._state, indexed)
        for subscriber in self._event_subscribers:
            try:
                subscriber.send_nowait(indexed)
            except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.WouldBlock):
                pass
        changed = self._changed_event()
        self._changed = anyio.Event()
        changed.set()
        return indexed.index

    def add_instance(self, *statuses: RunnerStatus) -> InstanceId:
        """An instance placed before the request, its runners already at `statuses`."""
        instance = self._instance()
        self.emit(InstanceCreated(instance=instance))
        for status in statuses:
            self.emit(RunnerStatusChanged(runner_id=instance.shards[0].runner_id, status=status))
        return instance.instance_id

    def after(self, delay_s: float, action: Callable[[], object]) -> None:
        """Run `action` in the background after `delay_s` (while a request is in flight)."""

        async def later() -> None:
            await anyio.sleep(delay_s)
            action()

        self._task_group().start_soon(later)

    def fail_instance(self, instance_id: InstanceId, reason: str) -> None:
        runner = self._state.instances[instance_id].shards[0].runner_id
        self.emit(RunnerStatusChanged(runner_id=runner, status=RunnerFailed(reason=reason)))

    def _instance(self, model_id: ModelId = MODEL) -> Instance:
        self._next_id += 1
        return Instance(
            instance_id=InstanceId(f"inst-{self._next_id}"),
            model_id=model_id,
            shards=(
                ShardAssignment(
                    runner_id=RunnerId(f"run-{self._next_id}"),
                    node_id=self.node_id,
                    device="cpu",
                    engine="mlx",
                    start_layer=0,
                    end_layer=30,
                    n_layers=30,
                ),
            ),
            created_at_ms=self._next_id,
        )

    def _accepted(
        self, command_id: CommandId, created: str | None, *events: Event
    ) -> CommandAccepted:
        last = self._state.last_index
        for event in events:
            last = self.emit(event)
        return CommandAccepted(command_id=command_id, created_id=created, last_index=last)

    def _place(self, command_id: CommandId, command: PlaceInstance) -> CommandReply:
        if self.model_card(command.model_id) is None:
            return CommandRejected(command_id=command_id, code="unknown_model", message="unknown")
        instance = self._instance(command.model_id)
        reply = self._accepted(command_id, instance.instance_id, InstanceCreated(instance=instance))

        async def load() -> None:
            for status in self.load_script:
                await anyio.sleep(self.load_step_s)
                self.emit(
                    RunnerStatusChanged(runner_id=instance.shards[0].runner_id, status=status)
                )

        self._task_group().start_soon(load)
        return reply

    def _create_task(self, command_id: CommandId, command: CreateTask) -> CommandReply:
        serving = [
            i
            for i in self._state.instances.values()
            if i.model_id == command.model_id
            and i.failed_reason is None
            and all(self._state.runners[s.runner_id].kind in SERVING_RUNNER_KINDS for s in i.shards)
        ]
        if not serving:
            return CommandRejected(
                command_id=command_id, code="no_instance", message="no instance serves it"
            )
        task = Task(
            task_id=command.task_id,
            instance_id=serving[0].instance_id,
            owner=command.owner,
            params=command.params,
            created_at_ms=0,
        )
        reply = self._accepted(command_id, command.task_id, TaskCreated(task=task))
        self._task_group().start_soon(self._generate, command.task_id)
        return reply

    async def _generate(self, task_id: TaskId) -> None:
        await anyio.sleep(self.queue_delay_s)
        if task_id not in self._state.tasks:
            return
        self.emit(TaskStarted(task_id=task_id))
        for step in self.script(task_id):
            if not isinstance(step, TokenChunk | StreamEnd | StreamError):
                await anyio.sleep(step)
                continue
            if task_id not in self._state.tasks:
                return  # cancelled
            stream = self._streams.get(task_id)
            if stream is not None:
                await stream.send(step)
            if isinstance(step, StreamEnd):
                self.emit(
                    TaskFinished(
                        task_id=task_id,
                        finish_reason=step.finish_reason,
                        prompt_tokens=step.prompt_tokens,
                        completion_tokens=step.completion_tokens,
                        decode_tokens_per_s=step.decode_tokens_per_s,
                    )
                )
                return
            if isinstance(step, StreamError):
                self.emit(TaskFailed(task_id=task_id, reason=step.message))
                return

    def _task_group(self) -> TaskGroup:
        assert self._tg is not None, "use the backend inside `serving(...)`"
        return self._tg

    def _changed_event(self) -> anyio.Event:
        if self._changed is None:
            self._changed = anyio.Event()
        return self._changed


@asynccontextmanager
async def serving(
    backend: ScriptedBackend,
    settings: ApiSettings = FAST,
    dashboard_dir: Path | None = None,
) -> AsyncGenerator[httpx.AsyncClient]:
    async with anyio.create_task_group() as tg:
        backend._tg = tg  # pyright: ignore[reportPrivateUsage]
        app = create_app(backend, dashboard_dir, settings)
        backend.app = app
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://exo") as client:
            yield client
        tg.cancel_scope.cancel()


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], **fields}


@dataclass
class SSE:
    comments: list[str]
    data: list[str]
    ids: list[int]

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(d) for d in self.data if d != "[DONE]"]


def parse_sse(text: str) -> SSE:
    sse = SSE([], [], [])
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(": "):
                sse.comments.append(line[2:])
            elif line.startswith("data: "):
                sse.data.append(line[len("data: ") :])
            elif line.startswith("id: "):
                sse.ids.append(int(line[len("id: ") :]))
    return sse


def assert_openai_error(response: httpx.Response, status: int, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]


# --- chat completions ---------------------------------------------------------------------


async def test_non_streaming_completion() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=5, seed=3))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello, world",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    create = next(c for c in backend.commands if isinstance(c, CreateTask))
    assert create.owner == "node-a"
    assert create.task_id == body["id"]
    assert create.params.sampling.max_tokens == 5
    assert create.params.sampling.seed == 3
    assert not any(isinstance(c, PlaceInstance | CancelTask) for c in backend.commands)


async def test_streaming_completion() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    sse = parse_sse(response.text)
    assert sse.data[-1] == "[DONE]"
    chunks = sse.json()
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Hello, world"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1


async def test_streaming_include_usage() -> None:
    backend = ScriptedBackend(script=tokens("a", "b", finish="length"))
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat(stream=True, max_tokens=2, stream_options={"include_usage": True}),
        )
    chunks = parse_sse(response.text).json()
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    assert all(c["usage"] is None for c in chunks[:-1])


async def test_stop_is_passed_to_the_runner() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        one = await client.post("/v1/chat/completions", json=chat(stop="\n"))
        many = await client.post("/v1/chat/completions", json=chat(stop=["a", "b", "a"]))
    assert one.status_code == many.status_code == 200
    creates = [c for c in backend.commands if isinstance(c, CreateTask)]
    assert [c.params.sampling.stop for c in creates] == [("\n",), ("a", "b")]


async def test_unknown_model_is_404() -> None:
    async with serving(ScriptedBackend()) as client:
        response = await client.post("/v1/chat/completions", json=chat(model="gpt-9"))
        model = await client.get("/v1/models/gpt-9")
    assert assert_openai_error(response, 404, "model_not_found")["param"] == "model"
    assert_openai_error(model, 404, "model_not_found")


async def test_malformed_json_is_400() -> None:
    async with serving(ScriptedBackend()) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b'{"model": ',
            headers={"content-type": "application/json"},
        )
        empty = await client.post("/v1/chat/completions")
    error = assert_openai_error(response, 400, "invalid_json")
    assert error["type"] == "invalid_request_error"
    assert_openai_error(empty, 400, "invalid_json")


async def test_invalid_field_is_422() -> None:
    async with serving(ScriptedBackend()) as client:
        response = await client.post("/v1/chat/completions", json=chat(temperature="hot"))
        missing = await client.post("/v1/chat/completions", json={"model": MODEL})
    assert assert_openai_error(response, 422, "float_type")["param"] == "temperature"
    assert assert_openai_error(missing, 422, "missing")["param"] == "messages"


async def test_body_without_json_content_type_still_parses() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=json.dumps(chat()).encode(),
            headers={"content-type": "application/x-www-form-urlencoded"},  # curl -d
        )
    assert response.status_code == 200


async def test_images_are_400() -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]
    async with serving(ScriptedBackend()) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat(messages=[{"role": "user", "content": content}])
        )
    assert "Image" in assert_openai_error(response, 400, "unsupported_feature")["message"]


async def test_placement_on_demand_streams_loading_comments() -> None:
    backend = ScriptedBackend(
        load_script=[RunnerLoading(progress=0.42), RunnerLoading(progress=0.9), RunnerReady()],
        load_step_s=0.2,
    )
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
        again = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200
    sse = parse_sse(response.text)
    assert "loading 0%" in sse.comments
    assert "loading 42%" in sse.comments
    assert "loading 90%" in sse.comments
    assert sse.data[-1] == "[DONE]"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in sse.json()) == "Hello, world"
    )
    assert again.status_code == 200
    assert [type(c).__name__ for c in backend.commands] == [
        "PlaceInstance",
        "CreateTask",
        "CreateTask",
    ]


async def test_concurrent_requests_place_one_instance() -> None:
    backend = ScriptedBackend(load_step_s=0.1)
    results: list[int] = []
    async with serving(backend) as client:

        async def one() -> None:
            results.append((await client.post("/v1/chat/completions", json=chat())).status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
    assert results == [200] * 5
    assert sum(isinstance(c, PlaceInstance) for c in backend.commands) == 1


async def test_placement_failure_is_503_before_streaming() -> None:
    backend = ScriptedBackend(reject={"place_instance": ("placement_failed", "cpu short by 1 GiB")})
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    error = assert_openai_error(response, 503, "placement_failed")
    assert error["message"] == "cpu short by 1 GiB"
    assert error["type"] == "server_error"


async def test_instance_failing_while_loading() -> None:
    backend = ScriptedBackend(
        load_script=[RunnerLoading(progress=0.3), RunnerFailed(reason="out of memory")],
        load_step_s=0.1,
    )
    async with serving(backend) as client:
        plain = await client.post("/v1/chat/completions", json=chat())
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert "out of memory" in assert_openai_error(plain, 503, "instance_failed")["message"]
    sse = parse_sse(streamed.text)
    assert streamed.status_code == 200  # the keep-alives had started the stream
    assert sse.comments[0] == "loading 0%"
    assert sse.json()[-1]["error"]["code"] == "instance_failed"
    assert "[DONE]" not in sse.data


async def test_load_timeout() -> None:
    backend = ScriptedBackend(load_script=[RunnerLoading(progress=0.1)])
    settings = FAST.model_copy(update={"load_timeout_s": 0.3})
    async with serving(backend, settings) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert_openai_error(response, 504, "model_load_timeout")


@pytest.mark.parametrize(
    ("code", "status", "api_code"),
    [
        ("invalid", 400, "invalid_request"),
        ("not_master", 503, "not_master"),
    ],
)
async def test_rejected_create_task_is_mapped(
    code: RejectionCode, status: int, api_code: str
) -> None:
    backend = ScriptedBackend(reject={"create_task": (code, "nope")})
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        plain = await client.post("/v1/chat/completions", json=chat())
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert assert_openai_error(plain, status, api_code)["message"] == "nope"
    assert_openai_error(streamed, status, api_code)  # nothing was streamed yet: a real status


async def test_a_master_without_the_instance_this_node_saw_gets_it_placed() -> None:
    """This node's state trails the master's: it saw a serving instance the master knows
    failed. The API places the model through the master and runs the task once more."""
    backend = ScriptedBackend(reject_once={"create_task": ("no_instance", "it failed")})
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world"
    assert [c.kind for c in backend.commands] == ["create_task", "place_instance", "create_task"]


async def test_no_instance_twice_is_503() -> None:
    backend = ScriptedBackend(reject={"create_task": ("no_instance", "nope")})
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        plain = await client.post("/v1/chat/completions", json=chat())
    assert assert_openai_error(plain, 503, "no_instance")["message"] == "nope"


async def test_silent_master_is_503() -> None:
    backend = ScriptedBackend(silent_master=True)
    backend.add_instance(RunnerReady())
    settings = FAST.model_copy(update={"command_timeout_s": 0.2})
    async with serving(backend, settings) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert_openai_error(response, 503, "master_unavailable")


def failing_script(task_id: TaskId) -> list[Step]:
    return [
        TokenChunk(task_id=task_id, text="Hel", token_id=1),
        StreamError(task_id=task_id, message="runner run-1 exited with signal 9"),
    ]


async def test_stream_error_mid_stream() -> None:
    backend = ScriptedBackend(script=failing_script)
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
        plain = await client.post("/v1/chat/completions", json=chat())
    sse = parse_sse(streamed.text)
    events = sse.json()
    assert events[1]["choices"][0]["delta"] == {"content": "Hel"}
    assert events[-1] == {
        "error": {
            "message": "runner run-1 exited with signal 9",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }
    assert "[DONE]" not in sse.data
    assert "signal 9" in assert_openai_error(plain, 500, "generation_failed")["message"]
    assert not any(isinstance(c, CancelTask) for c in backend.commands)


async def test_a_prompt_beyond_the_context_is_400() -> None:
    message = "The messages come to 9031 tokens, which leaves no room to generate"

    def too_long(task_id: TaskId) -> list[Step]:
        return [StreamError(task_id=task_id, message=message, code="context_length_exceeded")]

    backend = ScriptedBackend(script=too_long)
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        plain = await client.post("/v1/chat/completions", json=chat())
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    for response in (plain, streamed):
        error = assert_openai_error(response, 400, "context_length_exceeded")
        assert error["message"] == message
        assert error["type"] == "invalid_request_error"
        assert error["param"] == "messages"


async def test_instance_failure_without_stream_error_is_noticed() -> None:
    """Backstop for a node that never sends the StreamError: the state says the instance failed."""
    backend = ScriptedBackend(
        script=lambda task_id: [TokenChunk(task_id=task_id, text="a", token_id=0), 30.0]
    )
    instance_id = backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        backend.after(0.2, lambda: backend.fail_instance(instance_id, "segfault"))
        response = await client.post("/v1/chat/completions", json=chat())
    assert "segfault" in assert_openai_error(response, 503, "instance_failed")["message"]


async def test_stalled_generation_is_cancelled_with_504() -> None:
    backend = ScriptedBackend(
        script=lambda task_id: [TokenChunk(task_id=task_id, text="a", token_id=0), 30.0]
    )
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    events = parse_sse(response.text).json()
    assert events[-1]["error"]["code"] == "generation_stalled"
    assert any(isinstance(c, CancelTask) for c in backend.commands)


async def test_queued_request_gets_keepalives_and_is_not_stalled() -> None:
    """A task waiting behind others (status pending) is not a stall, however long it waits."""
    backend = ScriptedBackend(queue_delay_s=1.5)  # longer than FAST's 1 s stall timeout
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    sse = parse_sse(response.text)
    assert "queued" in sse.comments
    assert sse.data[-1] == "[DONE]"


async def test_client_disconnect_cancels_the_task() -> None:
    backend = ScriptedBackend(script=tokens("a", "b", "c", "d", "e", "f", pause=0.2))
    backend.add_instance(RunnerReady())
    async with serving(backend):
        app = backend.app
        sent: list[dict[str, Any]] = []
        disconnect = anyio.Event()
        body = json.dumps(chat(stream=True)).encode()
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            if b"content" in message.get("body", b"") and b'"b"' in message.get("body", b""):
                disconnect.set()

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"host", b"exo")],
            "client": ("127.0.0.1", 1),
            "server": ("exo", 80),
        }
        with anyio.fail_after(5):
            await asgi(app, scope, receive, send)
    cancels = [c for c in backend.commands if isinstance(c, CancelTask)]
    assert len(cancels) == 1
    create = next(c for c in backend.commands if isinstance(c, CreateTask))
    assert cancels[0].task_id == create.task_id
    assert not any(m.get("more_body") is False for m in sent)  # we stopped writing


async def asgi(app: Any, scope: dict[str, Any], receive: Any, send: Any) -> None:
    await app(scope, receive, send)


@asynccontextmanager
async def openai_client(backend: ScriptedBackend) -> AsyncGenerator[openai.AsyncOpenAI]:
    """The official client against the app, in process (over httpx2, the client's own)."""
    async with serving(backend):
        app = backend.app
        assert app is not None
        async with httpx2.AsyncClient(
            transport=httpx2.ASGITransport(app=app), base_url="http://exo/v1"
        ) as h2:
            yield openai.AsyncOpenAI(
                api_key="unused", base_url="http://exo/v1", http_client=h2, max_retries=0
            )


async def test_openai_client_against_the_app() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with openai_client(backend) as client:
        completion = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=8,
            temperature=0,
        )
        assert completion.choices[0].message.content == "Hello, world"
        assert completion.usage is not None and completion.usage.total_tokens == 12

        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        text = ""
        usage = None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        assert text == "Hello, world"
        assert usage is not None and usage.completion_tokens == 3

        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]

        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "hi"}]
            )
        assert missing.value.code == "model_not_found"

        backend.script = failing_script
        failing = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        with pytest.raises(openai.APIError, match="signal 9"):
            async for _ in failing:
                pass


async def test_openai_client_text_completions_and_responses_against_the_app() -> None:
    backend = ScriptedBackend(script=tokens("Hello", ", world", finish="length"))
    backend.add_instance(RunnerReady())
    async with openai_client(backend) as client:
        text = await client.completions.create(model=MODEL, prompt="Say", echo=True)
        assert text.choices[0].text == "SayHello, world"
        assert text.id.startswith("cmpl-")
        assert text.choices[0].finish_reason == "length"

        whole = await client.responses.create(
            model=MODEL, input="hi", instructions="Be brief.", max_output_tokens=2
        )
        assert whole.output_text == "Hello, world"
        assert (whole.status, whole.incomplete_details) == (
            "incomplete",
            IncompleteDetails(reason="max_output_tokens"),
        )
        assert whole.usage is not None and whole.usage.output_tokens == 2
        message = whole.output[0]
        assert isinstance(message, ResponseOutputMessage) and message.id.startswith("msg_")
        assert whole.id.startswith("resp_")

        kinds: list[str] = []
        deltas: list[str] = []
        final: Response | None = None
        async for event in await client.responses.create(
            model=MODEL, input=[{"role": "user", "content": "hi"}], stream=True
        ):
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.incomplete":
                final = event.response
        assert kinds == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.incomplete",
        ]
        assert "".join(deltas) == "Hello, world"
        assert final is not None and final.output_text == "Hello, world"
    creates = [c for c in backend.commands if isinstance(c, CreateTask)]
    assert creates[0].params.prompt == "Say" and creates[0].params.messages == ()
    assert creates[1].params.sampling.max_tokens == 2
    assert [m.role for m in creates[1].params.messages] == ["system", "user"]


# --- models, state, events ------------------------------------------------------------------


async def test_models() -> None:
    async with serving(ScriptedBackend()) as client:
        listed = (await client.get("/v1/models")).json()
        one = (await client.get(f"/v1/models/{MODEL}")).json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == [MODEL]
    assert one["id"] == MODEL
    assert one["object"] == "model"
    assert one["owned_by"] == "exo"


async def test_state() -> None:
    backend = ScriptedBackend()
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        body = (await client.get("/state")).json()
    assert body["node_id"] == "node-a"
    assert body["last_index"] == 1
    assert body["state_hash"] == backend.state().state_hash()
    assert State.model_validate_json(json.dumps(body["state"])) == backend.state()


async def test_cluster_is_this_nodes_view_alone() -> None:
    backend = ScriptedBackend()
    async with serving(backend) as client:
        state = (await client.get("/state")).json()
        cluster = (await client.get("/cluster")).json()
    assert cluster == state["cluster"] == backend.cluster_status().model_dump(mode="json")
    assert cluster["refused"] == {}


async def test_events_from_index() -> None:
    backend = ScriptedBackend(close_events_after=0.3)
    backend.add_instance(RunnerLoading(progress=0.1), RunnerReady())
    async with serving(backend) as client:
        response = await client.get("/events", params={"from": 1})
    assert response.status_code == 200
    sse = parse_sse(response.text)
    assert sse.ids == [1, 2]
    events = [IndexedEvent.model_validate_json(d) for d in sse.data]
    assert [e.index for e in events] == [1, 2]
    assert events[1].event == RunnerStatusChanged(runner_id=RunnerId("run-1"), status=RunnerReady())
    assert "keep-alive" in sse.comments


async def test_events_resume_with_last_event_id() -> None:
    backend = ScriptedBackend(close_events_after=0.1)
    backend.add_instance(RunnerLoading(progress=0.1), RunnerReady())
    async with serving(backend) as client:
        response = await client.get("/events", params={"from": 0}, headers={"Last-Event-ID": "1"})
        bad = await client.get("/events", headers={"Last-Event-ID": "x"})
        negative = await client.get("/events", params={"from": -1})
    assert parse_sse(response.text).ids == [2]
    assert_openai_error(bad, 400, "invalid_value")
    assert assert_openai_error(negative, 422, "greater_than_equal")["param"] == "from"


async def test_events_default_to_live_only() -> None:
    backend = ScriptedBackend(close_events_after=0.3)
    backend.add_instance(RunnerReady())
    async with serving(backend) as client:
        backend.after(0.1, backend.add_instance)
        response = await client.get("/events")
    assert parse_sse(response.text).ids == [2]


# --- instances ------------------------------------------------------------------------------


async def test_instances_lifecycle() -> None:
    backend = ScriptedBackend(load_step_s=10.0)
    async with serving(backend) as client:
        placed = await client.post(
            "/instances",
            json={
                "model": MODEL,
                "engine": "torch",
                "node_id": "node-a",
                "objective": "throughput",
                "context_length": 2048,
                "exclude_devices": ["node-b/cpu"],
            },
        )
        assert placed.status_code == 201, placed.text
        instance_id = placed.json()["instance_id"]
        listed = (await client.get("/instances")).json()
        one = await client.get(f"/instances/{instance_id}")
        deleted = await client.delete(f"/instances/{instance_id}")
        again = await client.delete(f"/instances/{instance_id}")
        after = (await client.get("/instances")).json()
        missing = await client.get(f"/instances/{instance_id}")
    place = next(c for c in backend.commands if isinstance(c, PlaceInstance))
    assert (place.model_id, place.engine, place.node_id) == (MODEL, "torch", "node-a")
    assert (place.objective, place.context_length, place.exclude_devices) == (
        "throughput",
        2048,
        ("node-b/cpu",),
    )
    assert [v["instance"]["instance_id"] for v in listed["data"]] == [instance_id]
    assert listed["data"][0]["status"] == "loading"
    assert one.json()["runners"] == {"run-1": {"kind": "spawning"}}
    assert deleted.status_code == 200
    assert deleted.json()["deleted"] is True
    assert_openai_error(again, 404, "not_found")
    assert after["data"] == []
    assert_openai_error(missing, 404, "not_found")


async def test_place_instance_errors() -> None:
    backend = ScriptedBackend(reject={"place_instance": ("placement_failed", "no room")})
    async with serving(backend) as client:
        unknown = await client.post("/instances", json={"model": "nope"})
        bad_engine = await client.post("/instances", json={"model": MODEL, "engine": "cuda"})
        rejected = await client.post("/instances", json={"model": MODEL})
    assert_openai_error(unknown, 404, "model_not_found")
    assert assert_openai_error(bad_engine, 422, "literal_error")["param"] == "engine"
    assert assert_openai_error(rejected, 503, "placement_failed")["message"] == "no room"


# --- models from the hub --------------------------------------------------------------------


HUB_CARD = CARD.model_copy(
    update={"model_id": ModelId("org/tiny-chat"), "source": f"hf:org/tiny-chat@{'a' * 40}"}
)


async def test_adding_a_hub_model_puts_its_card_in_the_catalogue() -> None:
    backend = ScriptedBackend(hub={"org/tiny-chat": HUB_CARD})
    async with serving(backend) as client:
        added = await client.post("/models", json={"repo": "org/tiny-chat"})
        again = await client.post("/models", json={"repo": "org/tiny-chat", "revision": "main"})
        listed = (await client.get("/v1/models")).json()
        one = await client.get("/v1/models/org/tiny-chat")
    assert added.status_code == 201
    assert ModelCard.model_validate(added.json()) == HUB_CARD
    assert again.status_code == 200  # the same card: nothing changed
    assert "org/tiny-chat" in [m["id"] for m in listed["data"]]
    assert one.status_code == 200
    assert [c for c in backend.commands if isinstance(c, AddModel)] == [AddModel(card=HUB_CARD)] * 2


async def test_a_chat_naming_a_hub_repository_adds_it_and_answers() -> None:
    backend = ScriptedBackend(hub={"org/tiny-chat": HUB_CARD})
    async with serving(backend) as client:
        answered = await client.post("/v1/chat/completions", json=chat(model="org/tiny-chat"))
        missing = await client.post("/v1/chat/completions", json=chat(model="org/missing"))
        preview = await client.get("/placement/preview", params={"model": "org/other"})
    assert answered.status_code == 200, answered.text
    assert answered.json()["model"] == "org/tiny-chat"
    assert isinstance(backend.commands[0], AddModel)
    assert isinstance(backend.commands[1], PlaceInstance)
    assert "on the hub" in assert_openai_error(missing, 404, "model_not_found")["message"]
    # A preview reads a hub model without adding it.
    assert_openai_error(preview, 404, "model_not_found")
    assert sum(isinstance(c, AddModel) for c in backend.commands) == 1


async def test_removing_a_hub_model_takes_it_out_of_the_catalogue() -> None:
    backend = ScriptedBackend(
        hub={"org/tiny-chat": HUB_CARD},
        reject_once={"remove_model": ("invalid", "org/tiny-chat still has instances")},
    )
    async with serving(backend) as client:
        await client.post("/models", json={"repo": "org/tiny-chat"})
        busy = await client.delete("/models/org/tiny-chat")
        removed = await client.delete("/models/org/tiny-chat")
        listed = (await client.get("/v1/models")).json()
    assert assert_openai_error(busy, 400, "invalid_request")["message"].endswith("instances")
    assert removed.status_code == 200
    assert removed.json()["model_id"] == "org/tiny-chat" and removed.json()["removed"]
    assert "org/tiny-chat" not in [m["id"] for m in listed["data"]]


@pytest.mark.parametrize(
    ("repo", "error", "status", "code"),
    [
        ("org/missing", None, 404, "model_not_found"),
        ("org/gated", HubDenied("org/gated: the hub refused access (401)"), 403, "hub_denied"),
        (
            "org/vision",
            UnsupportedModel("org/vision: model_type 'llava'"),
            400,
            "unsupported_model",
        ),
        ("org/down", HubError("cannot reach the hub"), 502, "hub_unavailable"),
        ("../etc", None, 400, "invalid_value"),
        ("no-owner", None, 400, "invalid_value"),
    ],
)
async def test_adding_a_hub_model_says_why_it_cannot(
    repo: str, error: Exception | None, status: int, code: str
) -> None:
    backend = ScriptedBackend(hub={} if error is None else {repo: error})
    async with serving(backend) as client:
        response = await client.post("/models", json={"repo": repo})
    body = assert_openai_error(response, status, code)
    assert body["param"] in ("repo", None)
    assert not [c for c in backend.commands if isinstance(c, AddModel)]


# --- the rest -------------------------------------------------------------------------------


async def test_a_body_past_the_limit_is_413_before_it_is_read() -> None:
    settings = FAST.model_copy(update={"max_request_bytes": 2048})
    backend = ScriptedBackend()
    big = chat(messages=[{"role": "user", "content": "a" * 4096}])

    async def chunked() -> AsyncIterator[bytes]:  # no content-length: counted as it comes
        for _ in range(8):
            yield b" " * 1024

    async with serving(backend, settings) as client:
        declared = await client.post("/v1/chat/completions", json=big)
        streamed = await client.post("/v1/chat/completions", content=chunked())
        placed = await client.post("/instances", json={"model": MODEL, "node_id": "x" * 4096})
        fits = await client.post("/v1/chat/completions", json=chat())
    for response in (declared, streamed, placed):
        body = assert_openai_error(response, 413, "request_too_large")
        assert body["message"] == "The request body is larger than this API accepts (2048 bytes)."
    assert fits.status_code == 200
    assert not [c for c in backend.commands if isinstance(c, PlaceInstance) and c.node_id]


async def test_healthz_and_unknown_route() -> None:
    async with serving(ScriptedBackend()) as client:
        health = await client.get("/healthz")
        unknown = await client.get("/v2/nothing")
    assert health.json() == {"status": "ok", "node_id": "node-a"}
    assert_openai_error(unknown, 404, "not_found")


async def test_dashboard_not_built_page(tmp_path: Path) -> None:
    async with serving(ScriptedBackend(), dashboard_dir=None) as client:
        no_dir = await client.get("/")
    async with serving(ScriptedBackend(), dashboard_dir=tmp_path) as client:
        empty_dir = await client.get("/")
    for response in (no_dir, empty_dir):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        assert "npm ci &amp;&amp; npm run build" in response.text
    assert str(tmp_path) in empty_dir.text


async def test_dashboard_is_served_when_built(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>dash</html>")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "app.js").write_text("console.log(1)")
    async with serving(ScriptedBackend(), dashboard_dir=tmp_path) as client:
        index = await client.get("/")
        asset = await client.get("/assets/app.js")
        models = await client.get("/v1/models")
    assert index.text == "<html>dash</html>"
    assert asset.text == "console.log(1)"
    assert models.status_code == 200


async def test_wrong_method_on_an_api_path_is_405(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<html>dash</html>")
    for dashboard_dir in (tmp_path, None):
        async with serving(ScriptedBackend(), dashboard_dir=dashboard_dir) as client:
            chat = await client.get("/v1/chat/completions")
            instance = await client.put("/instances/abc")
            state = await client.post("/state", json={})
            missing = await client.get("/v1/nothing")
            legacy = await client.post("/v1/embeddings", json={"input": "hi"})
        body = assert_openai_error(chat, 405, "method_not_allowed")
        assert body["message"] == "GET is not allowed on /v1/chat/completions; use POST."
        assert chat.headers["allow"] == "POST"
        assert_openai_error(instance, 405, "method_not_allowed")
        assert instance.headers["allow"] == "DELETE, GET"
        assert_openai_error(state, 405, "method_not_allowed")
        assert state.headers["allow"] == "GET"
        assert_openai_error(missing, 404, "not_found")
        # Not "method not allowed" (the dashboard's files take every path but for GET only).
        body = assert_openai_error(legacy, 404, "not_found")
        assert body["message"].startswith("There is no POST /v1/embeddings;")
