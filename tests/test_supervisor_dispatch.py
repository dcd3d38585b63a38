"""A task the runner cannot be handed (its frame is over the runner protocol's limit)
fails alone, to its owner and in the state; the runner and the other tasks go on."""

from pathlib import Path
from typing import cast

import anyio
import pytest
from anyio.abc import Process

from exo.routing import topics
from exo.routing.router import Router
from exo.shared.types.events import Event, TaskFailed
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamError
from exo.shared.types.tasks import Task
from exo.worker.runner.protocol import MAX_FRAME_BYTES
from exo.worker.supervisor import RunnerSupervisor
from tests.factories import INSTANCES, NODES, chat_params, instance

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class _Stdin:
    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def send(self, data: bytes) -> None:
        self.frames.append(data)


class _Process:
    returncode: int | None = None

    def __init__(self) -> None:
        self.stdin = _Stdin()


class _Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> int:
        self.events.append(event)
        return len(self.events)

    async def wait_indexed(self, origin_seq: int, timeout_s: float) -> None:
        return None


async def test_a_task_too_large_for_the_runner_fails_alone(tmp_path: Path) -> None:
    (shard,) = instance(INSTANCES[0], NODES[0]).shards
    router, sink, process = Router(), _Sink(), _Process()
    supervisor = RunnerSupervisor(
        shard=shard,
        model_dir=tmp_path,
        emitter=sink,
        router=router,
        load_timeout_s=10,
        on_change=lambda: None,
    )
    supervisor._process = cast(Process, process)  # pyright: ignore[reportPrivateUsage]

    def task(task_id: str, text: str) -> Task:
        return Task(
            task_id=TaskId(task_id),
            instance_id=INSTANCES[0],
            owner=NODES[1],
            params=chat_params(text),
            created_at_ms=1,
        )

    with router.subscribe(topics.TOKENS) as tokens:
        await supervisor.dispatch(task("huge", "a" * MAX_FRAME_BYTES))
        await supervisor.dispatch(task("small", "hi"))
        with anyio.fail_after(1):
            published = await tokens.receive()
    assert published.to == NODES[1]
    assert isinstance(published.message, StreamError)
    assert published.message.task_id == "huge"
    assert "too large for the runner" in published.message.message
    (failed,) = sink.events
    assert isinstance(failed, TaskFailed) and failed.task_id == "huge"
    assert len(process.stdin.frames) == 1  # the small one went through
    assert set(supervisor.in_flight) == {TaskId("small")}
