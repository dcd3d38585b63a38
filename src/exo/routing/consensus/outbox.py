"""This node's producer side: local events and commands kept until the log answers them.

Local events leave when the applied state's `origin_seqs` covers them (at-least-once from
here, exactly-once in the log: the master drops what its log already holds). Commands
leave when their `CommandDecided` entry is committed (or the master's reply arrives), or
when their bound runs out.
"""

from dataclasses import dataclass

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
class _PendingCommand:
    seq: int
    envelope: CommandEnvelope
    deadline: int
    sent_at: int = _NEVER


class Outbox:
    def __init__(self, command_origin: EventOrigin, next_command_seq: int, batch: int) -> None:
        self.command_origin = command_origin
        self._next_seq = next_command_seq
        self._batch = batch
        self._events: dict[tuple[EventOrigin, int], _PendingEvent] = {}
        self._commands: dict[CommandId, _PendingCommand] = {}

    def __len__(self) -> int:
        return len(self._events) + len(self._commands)

    def resume_after(self, seq: int) -> None:
        """Commands this origin sent before a restart are in the log up to `seq`."""
        self._next_seq = max(self._next_seq, seq + 1)

    def add_events(self, events: list[LocalEvent], state: State) -> None:
        for event in events:
            if event.origin_seq > state.origin_seqs.get(event.origin, -1):
                self._events.setdefault((event.origin, event.origin_seq), _PendingEvent(event))

    def add_command(self, envelope: CommandEnvelope, deadline: int) -> None:
        if envelope.command_id in self._commands:
            return
        self._commands[envelope.command_id] = _PendingCommand(self._next_seq, envelope, deadline)
        self._next_seq += 1

    def prune(self, state: State) -> None:
        """Forget local events the applied state has indexed."""
        done = [key for key in self._events if key[1] <= state.origin_seqs.get(key[0], -1)]
        for key in done:
            del self._events[key]

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
        for pending in (*self._events.values(), *self._commands.values()):
            pending.sent_at = _NEVER

    def due_events(self, now: int, resend_ticks: int) -> ForwardLocalEvents | None:
        """Per origin, from its first unsent or stale event on, in seq order: the master
        takes only the next expected seq, so a re-send carries the ones after it too."""
        chosen: list[_PendingEvent] = []
        sending: set[EventOrigin] = set()
        for (origin, _seq), pending in sorted(self._events.items()):
            if origin in sending or now - pending.sent_at >= resend_ticks:
                sending.add(origin)
                chosen.append(pending)
        chosen = chosen[: self._batch]
        if not chosen:
            return None
        for p in chosen:
            p.sent_at = now
        return ForwardLocalEvents(events=tuple(p.event for p in chosen))

    def due_commands(self, now: int, resend_ticks: int) -> ForwardCommands | None:
        pending = sorted(self._commands.values(), key=lambda c: c.seq)
        if not any(now - c.sent_at >= resend_ticks for c in pending):
            return None
        chosen = pending[: self._batch]
        for c in chosen:
            c.sent_at = now
        return ForwardCommands(
            origin=self.command_origin,
            commands=tuple(SequencedCommand(seq=c.seq, envelope=c.envelope) for c in chosen),
        )
