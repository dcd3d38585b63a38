"""Publish/subscribe between a node's components.

On one node every topic is delivered in-process; the cluster service carries messages
addressed to another node over the mesh, so no component knows where its peers run.
"""

from collections.abc import Generator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from exo.routing.topics import Topic

T = TypeVar("T")


class Router:
    def __init__(self, buffer_size: int = 4096) -> None:
        self._buffer_size = buffer_size
        self._subscribers: dict[str, list[MemoryObjectSendStream[Any]]] = {}

    @contextmanager
    def subscribe(self, topic: Topic[T]) -> Generator[MemoryObjectReceiveStream[T]]:
        send, receive = anyio.create_memory_object_stream[T](self._buffer_size)
        subscribers = self._subscribers.setdefault(topic.name, [])
        subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            subscribers.remove(send)
            send.close()

    async def publish(self, topic: Topic[T], message: T) -> None:
        """Deliver to every subscriber, waiting for buffer space (backpressure, no drops)."""
        for send in list(self._subscribers.get(topic.name, ())):
            try:
                await send.send(message)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                continue  # the subscriber left while we were sending
