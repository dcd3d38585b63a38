"""A receive-with-timeout that never loses an item to the timeout.

Cancelling `stream.receive()` at a deadline can drop an item that arrived in the same loop
turn; here one pump task owns the stream and the waiter only ever cancels an `Event.wait()`.
"""

from collections import deque
from typing import Generic, TypeVar

import anyio
from anyio.abc import ObjectReceiveStream

T = TypeVar("T")


class InboxClosed(Exception):
    """The source stream ended and every item it delivered has been taken."""


class Inbox(Generic[T]):
    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._arrived = anyio.Event()
        self._closed = False

    async def pump(self, stream: ObjectReceiveStream[T]) -> None:
        """Run in a task group for as long as items are wanted."""
        try:
            async for item in stream:
                self._items.append(item)
                self._arrived.set()
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass
        finally:
            self._closed = True
            self._arrived.set()

    async def next(self, timeout_s: float) -> T | None:
        """The next item, None when `timeout_s` passed without one; InboxClosed at the end."""
        if not self._items and not self._closed:
            with anyio.move_on_after(timeout_s):
                await self._arrived.wait()
        if self._items:
            item = self._items.popleft()
            if not self._items and not self._closed:
                self._arrived = anyio.Event()
            return item
        if self._closed:
            raise InboxClosed
        return None
