"""This node's durable copy of the global log and the state folded from it.

Every indexed event is appended (fsync'd) before it is applied, so what a node has applied
it can always replay. The master appends through the same replica, so a node never holds
two copies of its log.
"""

import math
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger
from pydantic import TypeAdapter

from exo.shared.apply import apply
from exo.shared.eventlog import EventLogFile
from exo.shared.types.events import IndexedEvent
from exo.shared.types.state import State

_STATE = TypeAdapter(State)
_EVENT = TypeAdapter(IndexedEvent)
# A live subscriber this far behind is cut off; it resumes from the log (no silent drop).
_SUBSCRIBER_BUFFER = 10_000


class LogGapError(RuntimeError):
    """Received events that do not follow the last held index; the range must be fetched."""

    def __init__(self, last_index: int, first_received: int) -> None:
        super().__init__(f"log gap: hold up to {last_index}, received from {first_received}")
        self.last_index = last_index
        self.first_received = first_received


class LogReplica:
    def __init__(self, path: Path, *, fsync: bool = True, snapshot_every: int = 1000) -> None:
        self._path = path
        self._snapshot_every = snapshot_every
        self._log = EventLogFile(path, fsync=fsync)
        self._state = self._replay()
        self._changed = anyio.Event()
        self._subscribers: list[MemoryObjectSendStream[IndexedEvent]] = []
        self._append_lock = anyio.Lock()

    def _replay(self) -> State:
        state = State()
        snapshot = self._log.load_snapshot()
        if snapshot is not None:
            _index, payload = snapshot
            state = _STATE.validate_json(payload)
        start = state.last_index + 1
        if self._log.last_index >= start:
            for _index, payload in self._log.read_range(start, self._log.last_index + 1):
                state = apply(state, _EVENT.validate_json(payload))
        logger.info(f"replayed event log to index {state.last_index} ({self._path})")
        return state

    @property
    def state(self) -> State:
        return self._state

    @property
    def last_index(self) -> int:
        return self._state.last_index

    async def ingest(self, events: Sequence[IndexedEvent]) -> None:
        """Persist then apply the events this replica does not hold yet (in order)."""
        async with self._append_lock:
            fresh = [e for e in events if e.index > self._state.last_index]
            if not fresh:
                return
            if fresh[0].index != self._state.last_index + 1:
                raise LogGapError(self._state.last_index, fresh[0].index)
            state = self._state
            for event in fresh:  # validate the whole batch before anything touches disk
                state = apply(state, event)
            records = [(e.index, _EVENT.dump_json(e)) for e in fresh]
            await anyio.to_thread.run_sync(self._log.append_many, records)
            self._state = state
            for event in fresh:
                self._publish(event)
            self._changed.set()
            self._changed = anyio.Event()
            if state.last_index % self._snapshot_every == 0 and state.last_index > 0:
                await anyio.to_thread.run_sync(self._snapshot, state)

    def _snapshot(self, state: State) -> None:
        self._log.write_snapshot(state.last_index, _STATE.dump_json(state))
        self._log.compact(state.last_index)
        logger.debug(f"snapshot at index {state.last_index}")

    def _publish(self, event: IndexedEvent) -> None:
        for send in list(self._subscribers):
            if send.statistics().current_buffer_used >= _SUBSCRIBER_BUFFER:
                logger.warning("event subscriber fell too far behind; disconnecting it")
                self._subscribers.remove(send)
                send.close()
                continue
            try:
                send.send_nowait(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.remove(send)

    async def wait_for(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        with anyio.fail_after(timeout_s):
            while not predicate(self._state):
                await self._changed.wait()
        return self._state

    async def wait_changed(self) -> State:
        await self._changed.wait()
        return self._state

    def read_range(self, start: int, end: int) -> list[IndexedEvent]:
        """Held events in [start, end); events compacted into the snapshot are not returned."""
        start = max(start, self._log.first_index)
        end = min(end, self._state.last_index + 1)
        if start >= end:
            return []
        return [_EVENT.validate_json(p) for _i, p in self._log.read_range(start, end)]

    @asynccontextmanager
    async def subscribe(
        self, from_index: int
    ) -> AsyncGenerator[MemoryObjectReceiveStream[IndexedEvent]]:
        """Held events from `from_index`, then live ones, with no gap between the two."""
        send, receive = anyio.create_memory_object_stream[IndexedEvent](math.inf)
        async with self._append_lock:  # no event can be applied between backlog and live
            for event in self.read_range(from_index, self._state.last_index + 1):
                send.send_nowait(event)
            self._subscribers.append(send)
        try:
            with receive:
                yield receive
        finally:
            if send in self._subscribers:
                self._subscribers.remove(send)
            send.close()

    def close(self) -> None:
        self._log.close()
