"""Per-task token streams on the node that owns the client connection.

Tokens arrive on the TOKENS topic. A task that leaves the state without finishing (its
runner failed, its node restarted, it was cancelled) gets a StreamError here, so a waiting
client always learns why, even if the runner's node vanished without a word.
"""

import math
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from exo.routing import topics
from exo.routing.router import Router
from exo.shared.types.events import IndexedEvent, TaskCancelled, TaskCreated, TaskFailed
from exo.shared.types.ids import InstanceId, NodeId, TaskId
from exo.shared.types.stream import StreamEnd, StreamError, StreamMessage
from exo.shared.views import StateView


class StreamHub:
    def __init__(self, *, node_id: NodeId, router: Router, replica: StateView) -> None:
        self._node_id = node_id
        self._router = router
        self._replica = replica
        self._streams: dict[TaskId, MemoryObjectSendStream[StreamMessage]] = {}
        self._instance_of: dict[TaskId, InstanceId] = {}

    @asynccontextmanager
    async def subscribe(
        self, task_id: TaskId
    ) -> AsyncGenerator[MemoryObjectReceiveStream[StreamMessage]]:
        # Unbounded is bounded here: a task yields at most max_tokens chunks and one end.
        send, receive = anyio.create_memory_object_stream[StreamMessage](math.inf)
        self._streams[task_id] = send
        try:
            with receive:
                yield receive
        finally:
            self._streams.pop(task_id, None)
            self._instance_of.pop(task_id, None)
            send.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(self._relay_tokens)
            tg.start_soon(self._watch_log)
            task_status.started()

    async def _relay_tokens(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with self._router.subscribe(topics.TOKENS) as tokens:
            task_status.started()
            async for addressed in tokens:
                if addressed.to == self._node_id:
                    self._deliver(addressed.message)

    def _deliver(self, message: StreamMessage) -> None:
        send = self._streams.get(message.task_id)
        if send is None:
            return
        send.send_nowait(message)
        if isinstance(message, StreamEnd | StreamError):
            self._streams.pop(message.task_id, None)
            self._instance_of.pop(message.task_id, None)
            send.close()

    async def _watch_log(self) -> None:
        while True:  # a subscription ends when the log is replaced by a snapshot: resume
            async with self._replica.subscribe(self._replica.last_index + 1) as events:
                async for indexed in events:
                    self._after_event(indexed)
            self._after_state()

    def _after_event(self, indexed: IndexedEvent) -> None:
        match indexed.event:
            case TaskCreated(task=task) if task.task_id in self._streams:
                self._instance_of[task.task_id] = task.instance_id
            case TaskFailed(task_id=task_id, reason=reason):
                self._fail(task_id, f"generation failed: {reason}")
            case TaskCancelled(task_id=task_id, reason=reason):
                self._fail(task_id, f"cancelled: {reason}")
            case _:
                pass
        self._after_state()

    def _after_state(self) -> None:
        instances = self._replica.state.instances
        for task_id, instance_id in list(self._instance_of.items()):
            instance = instances.get(instance_id)
            if instance is None:
                self._fail(task_id, "the instance serving this request was deleted")
            elif instance.failed_reason is not None:
                self._fail(task_id, f"runner failed: {instance.failed_reason}")

    def _fail(self, task_id: TaskId, message: str) -> None:
        self._instance_of.pop(task_id, None)
        self._deliver(StreamError(task_id=task_id, message=message))
