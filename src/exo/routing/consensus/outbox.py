"""This node's producer side: local events and commands kept until the log answers them.

Local events leave when the applied state's `origin_seqs` covers them (at-least-once from
here, exactly-once in the log: the master drops what its log already holds). Commands
leave when their `CommandDecided` entry is committed (or the master's reply arrives), or
when their bound runs out.
"""

import bisect
from collections import deque
from dataclasses import dataclass, field
from itertools import islice

from exo.routing.consensus.messages import ForwardCommands, ForwardLocalEvents, SequencedCommand
from exo.shared.types.commands import CommandEnvelope, CommandRejected, CommandReply
from exo.shared.types.events import EventOrigin, LocalEvent
from exo.shared.types.ids import CommandId
from exo.shared.types.state import State

_NEVER = -(10**9)


@dataclass
class _PendingEvent:
    event: LocalEvent
    sent_at: int = _NEVER


@dataclass
class _OriginQueue:
    """One producer's pending events in seq order; `unsent` indexes the first one never
    sent. Every operation is O(events touched), not O(events pending)."""

    pending: deque[_PendingEvent] = field(default_factory=deque[_PendingEvent])
    unsent: int = 0


@dataclass
class _PendingCommand:
    seq: int
    envelope: CommandEnvelope
    deadline: int
    size: int  # its JSON's bytes
    sent_at: int = _NEVER


class Outbox:
    def __init__(
        self, command_origin: EventOrigin, next_command_seq: int, batch: int, batch_bytes: int
    ) -> None:
        self.command_origin = command_origin
        self._next_seq = next_command_seq
        self._batch = batch
        self._batch_bytes = batch_bytes
        self._window = 4 * batch
        self._events: dict[EventOrigin, _OriginQueue] = {}
        self._commands: dict[CommandId, _PendingCommand] = {}

    def __len__(self) -> int:
        return sum(len(q.pending) for q in self._events.values()) + len(self._commands)

    def resume_after(self, seq: int) -> None:
        """Commands this origin sent before a restart are in the log up to `seq`."""
        self._next_seq = max(self._next_seq, seq + 1)

    def add_events(self, events: list[LocalEvent], state: State) -> None:
        for event in events:
            if event.origin_seq <= state.origin_seqs.get(event.origin, -1):
                continue  # indexed already
            queue = self._events.setdefault(event.origin, _OriginQueue())
            if not queue.pending or event.origin_seq > queue.pending[-1].event.origin_seq:
                queue.pending.append(_PendingEvent(event))  # the usual case: in order
                continue
            seqs = [p.event.origin_seq for p in queue.pending]
            at = bisect.bisect_left(seqs, event.origin_seq)
            if seqs[at] != event.origin_seq:  # not held yet: an earlier one, late
                queue.pending.insert(at, _PendingEvent(event))
                queue.unsent = min(queue.unsent, at)

    def add_command(self, envelope: CommandEnvelope, deadline: int) -> None:
        if envelope.command_id in self._commands:
            return
        size = len(envelope.model_dump_json())
        self._commands[envelope.command_id] = _PendingCommand(
            self._next_seq, envelope, deadline, size
        )
        self._next_seq += 1

    def prune(self, state: State) -> None:
        """Forget local events the applied state has indexed."""
        for origin, queue in list(self._events.items()):
            acked = state.origin_seqs.get(origin, -1)
            while queue.pending and queue.pending[0].event.origin_seq <= acked:
                queue.pending.popleft()
                queue.unsent = max(0, queue.unsent - 1)
            if not queue.pending:
                del self._events[origin]

    def answered(self, reply: CommandReply) -> bool:
        return self._commands.pop(reply.command_id, None) is not None

    def expire(self, now: int, master_known: bool) -> list[CommandRejected]:
        expired = [c for c in self._commands.values() if c.deadline <= now]
        for command in expired:
            del self._commands[command.envelope.command_id]
        code = "unavailable" if master_known else "not_master"
        return [
            CommandRejected(
                command_id=c.envelope.command_id,
                code=code,
                message="no master answered in time; the command may still take effect"
                if master_known
                else "no master elected in time",
            )
            for c in expired
        ]

    def resend_all(self) -> None:
        """A new master: send everything again at once."""
        for queue in self._events.values():
            queue.unsent = 0
            if queue.pending:
                queue.pending[0].sent_at = _NEVER
        for command in self._commands.values():
            command.sent_at = _NEVER

    def due_events(self, now: int, resend_ticks: int) -> ForwardLocalEvents | None:
        """Per origin in seq order: from its first event when that one is stale (the
        master takes only the next expected seq, so a re-send carries the ones after it
        too), else from its first never-sent one."""
        chosen: list[_PendingEvent] = []
        for _origin, queue in sorted(self._events.items()):
            room = self._batch - len(chosen)
            if room <= 0:
                break
            if now - queue.pending[0].sent_at >= resend_ticks:
                start = 0
            elif queue.unsent < min(len(queue.pending), self._window):
                start = queue.unsent
                # Flow control: at most `window` sent and not yet indexed per producer,
                # so a burst cannot overrun the link and turn into gaps the master drops.
                room = min(room, self._window - start)
            else:
                continue
            taken = list(islice(queue.pending, start, start + room))
            for p in taken:
                p.sent_at = now
            queue.unsent = max(queue.unsent, start + len(taken))
            chosen.extend(taken)
        if not chosen:
            return None
        return ForwardLocalEvents(events=tuple(p.event for p in chosen))

    def due_commands(self, now: int, resend_ticks: int) -> ForwardCommands | None:
        due = sorted(
            (c for c in self._commands.values() if now - c.sent_at >= resend_ticks),
            key=lambda c: c.seq,
        )
        if not due:
            return None
        # In seq order, as many as fit (at least one); the rest are still due next time.
        # The master takes them in seq order: one that arrives after a gap waits for the
        # gap's re-send.
        chosen: list[_PendingCommand] = []
        total = 0
        for c in due[: self._batch]:
            total += c.size
            if chosen and total > self._batch_bytes:
                break
            chosen.append(c)
        for c in chosen:
            c.sent_at = now
        return ForwardCommands(
            origin=self.command_origin,
            commands=tuple(SequencedCommand(seq=c.seq, envelope=c.envelope) for c in chosen),
        )
