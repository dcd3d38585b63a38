"""The master: turns commands and workers' local events into indexed, durable events.

Only the elected node runs it (on one node: always). It appends through the node's own
replica before broadcasting, so an event is durable before anyone acts on it.
"""

import time
from collections.abc import Callable, Sequence

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from loguru import logger

from exo.master.decide import DecideContext, Decision, decide
from exo.routing import topics
from exo.routing.router import Router
from exo.shared.eventlog import EventLogError
from exo.shared.replica import LogReplica
from exo.shared.types.commands import CommandAccepted, CommandEnvelope, CommandRejected
from exo.shared.types.events import Event, EventOrigin, IndexedEvent, LocalEvent
from exo.shared.types.ids import ModelId, new_instance_id, new_runner_id
from exo.shared.types.instances import EngineName
from exo.shared.types.models import ModelCard

# Local events are indexed in batches of up to this many: one fsync per batch.
_MAX_BATCH = 256


class Master:
    def __init__(
        self,
        *,
        origin: EventOrigin,
        router: Router,
        replica: LogReplica,
        card_for: Callable[[ModelId], ModelCard | None],
        default_engine: EngineName,
        term: int = 1,
    ) -> None:
        self._origin = origin
        self._router = router
        self._replica = replica
        self._card_for = card_for
        self._default_engine: EngineName = default_engine
        self._term = max(term, replica.state.term)
        self._own_seq = replica.state.origin_seqs.get(origin, -1)
        self._lock = anyio.Lock()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        logger.info(f"master active (term {self._term}, log at {self._replica.last_index})")
        with (
            self._router.subscribe(topics.COMMANDS) as commands,
            self._router.subscribe(topics.LOCAL_EVENTS) as local_events,
        ):
            task_status.started()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._serve_commands, commands)
                tg.start_soon(self._serve_local_events, local_events)

    async def _serve_commands(self, commands: MemoryObjectReceiveStream[CommandEnvelope]) -> None:
        async for envelope in commands:
            reply = await self._handle_command(envelope)
            await self._router.publish(
                topics.COMMAND_REPLIES, topics.AddressedReply(to=envelope.origin, reply=reply)
            )

    async def _handle_command(self, envelope: CommandEnvelope) -> CommandAccepted | CommandRejected:
        async with self._lock:
            ctx = DecideContext(
                now_ms=int(time.time() * 1000),
                new_instance_id=new_instance_id(),
                new_runner_ids=[new_runner_id() for _ in range(64)],
                default_engine=self._default_engine,
            )
            try:
                outcome = decide(self._replica.state, envelope, self._card_for, ctx)
            except Exception as exc:  # a bug must reject the command, not kill the master
                logger.exception(f"command {envelope.command_id} failed")
                return CommandRejected(
                    command_id=envelope.command_id, code="invalid", message=str(exc)
                )
            if not isinstance(outcome, Decision):
                logger.info(f"rejected {envelope.command.kind}: {outcome.message}")
                return CommandRejected(
                    command_id=envelope.command_id, code=outcome.code, message=outcome.message
                )
            own = [self._next_own(e) for e in outcome.events]
            try:
                await self._index(own)
            except EventLogError as exc:
                self._own_seq -= len(own)
                logger.error(f"could not persist events of {envelope.command.kind}: {exc}")
                return CommandRejected(
                    command_id=envelope.command_id,
                    code="unavailable",
                    message=f"the event log could not be written: {exc}",
                )
            return CommandAccepted(
                command_id=envelope.command_id,
                created_id=outcome.created_id,
                last_index=self._replica.last_index,
            )

    def _next_own(self, event: Event) -> LocalEvent:
        self._own_seq += 1
        return LocalEvent(origin=self._origin, origin_seq=self._own_seq, event=event)

    async def _serve_local_events(
        self, local_events: MemoryObjectReceiveStream[LocalEvent]
    ) -> None:
        async for first in local_events:
            batch = [first]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(local_events.receive_nowait())
                except anyio.WouldBlock:
                    break
            async with self._lock:
                try:
                    await self._index(self._in_order_new(batch))
                except EventLogError as exc:  # producers re-send; nothing was applied
                    logger.error(f"could not persist {len(batch)} local events: {exc}")

    def _in_order_new(self, batch: Sequence[LocalEvent]) -> list[LocalEvent]:
        """Exactly-once, in order per origin: drop re-sends and anything past a gap."""
        expected = dict(self._replica.state.origin_seqs)
        accepted: list[LocalEvent] = []
        for local in batch:
            next_seq = expected.get(local.origin, -1) + 1
            if local.origin_seq == next_seq:
                accepted.append(local)
                expected[local.origin] = local.origin_seq
            elif local.origin_seq > next_seq:
                logger.debug(f"{local.origin} skipped to {local.origin_seq}; waiting for re-send")
        return accepted

    async def _index(self, events: Sequence[LocalEvent]) -> None:
        if not events:
            return
        start = self._replica.last_index + 1
        indexed = [
            IndexedEvent(
                index=start + i,
                term=self._term,
                origin=e.origin,
                origin_seq=e.origin_seq,
                event=e.event,
            )
            for i, e in enumerate(events)
        ]
        await self._replica.ingest(indexed)
        for event in indexed:
            await self._router.publish(topics.GLOBAL_EVENTS, event)
