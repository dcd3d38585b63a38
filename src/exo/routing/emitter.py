"""At-least-once delivery of this node's local events to the master.

Each event gets the next `origin_seq`; it is re-sent until the indexed copy comes back in
the replicated log. The master keeps only the next expected seq per origin, so re-sends
and duplicates are dropped there and the log holds each event exactly once.
"""

import time

import anyio
from loguru import logger

from exo.routing import topics
from exo.routing.router import Router
from exo.shared.replica import LogReplica
from exo.shared.types.events import Event, EventOrigin, LocalEvent


class EventEmitter:
    def __init__(
        self,
        *,
        origin: EventOrigin,
        router: Router,
        replica: LogReplica,
        resend_after_s: float = 2.0,
    ) -> None:
        self.origin = origin
        self._router = router
        self._replica = replica
        self._resend_after_s = resend_after_s
        self._next_seq = replica.state.origin_seqs.get(origin, -1) + 1
        self._pending: dict[int, tuple[LocalEvent, float]] = {}

    async def emit(self, event: Event) -> int:
        """Send an event; returns its origin_seq (see `wait_indexed`)."""
        local = LocalEvent(origin=self.origin, origin_seq=self._next_seq, event=event)
        self._next_seq += 1
        self._pending[local.origin_seq] = (local, time.monotonic())
        await self._router.publish(topics.LOCAL_EVENTS, local)
        return local.origin_seq

    async def wait_indexed(self, origin_seq: int, timeout_s: float) -> None:
        await self._replica.wait_for(
            lambda s: s.origin_seqs.get(self.origin, -1) >= origin_seq, timeout_s
        )

    async def run(self) -> None:
        while True:
            with anyio.move_on_after(self._resend_after_s / 2):
                await self._replica.wait_changed()
            acked = self._replica.state.origin_seqs.get(self.origin, -1)
            for seq in [s for s in self._pending if s <= acked]:
                del self._pending[seq]
            now = time.monotonic()
            stale = sorted(
                s for s, (_, sent) in self._pending.items() if now - sent > self._resend_after_s
            )
            if stale:
                logger.debug(f"re-sending {len(stale)} local events from seq {stale[0]}")
            for seq in stale:  # in order: the master accepts only the next expected seq
                local, _ = self._pending[seq]
                self._pending[seq] = (local, now)
                await self._router.publish(topics.LOCAL_EVENTS, local)
