"""What components read the cluster through and emit events into (the node's cluster
service implements both; tests may pass anything that does)."""

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from anyio.streams.memory import MemoryObjectReceiveStream

from exo.shared.types.events import Event, IndexedEvent
from exo.shared.types.state import State


class StateView(Protocol):
    """The committed state (durable on this node) and the entries that made it."""

    @property
    def state(self) -> State: ...

    @property
    def last_index(self) -> int: ...

    async def wait_for(self, predicate: Callable[[State], bool], timeout_s: float) -> State: ...

    async def wait_changed(self) -> State: ...

    def read_range(self, start: int, end: int) -> list[IndexedEvent]: ...

    def subscribe(
        self, from_index: int
    ) -> AbstractAsyncContextManager[MemoryObjectReceiveStream[IndexedEvent]]: ...


class EventSink(Protocol):
    """Local events to the master: at-least-once, indexed exactly once, in order."""

    async def emit(self, event: Event) -> int:
        """Returns the event's origin_seq (see `wait_indexed`)."""
        ...

    async def wait_indexed(self, origin_seq: int, timeout_s: float) -> None: ...
