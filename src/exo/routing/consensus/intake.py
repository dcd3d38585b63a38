"""The master's intake, pure: which local events to index, and a command's log entries."""

from collections.abc import Iterable, Mapping, Sequence

from exo.master.decide import Decision, Rejection
from exo.routing.consensus.entries import CommandDecided, LogEntry
from exo.shared.types.commands import (
    CommandAccepted,
    CommandEnvelope,
    CommandRejected,
    CommandReply,
)
from exo.shared.types.events import Event, EventOrigin, LocalEvent


def in_order_new(
    origin_seqs: Mapping[EventOrigin, int], events: Iterable[LocalEvent]
) -> list[LocalEvent]:
    """Exactly-once, in order per origin (as master.py): drop re-sends and what follows
    a gap; the producer re-sends from the gap."""
    expected = dict(origin_seqs)
    accepted: list[LocalEvent] = []
    for local in events:
        if local.origin_seq == expected.get(local.origin, -1) + 1:
            accepted.append(local)
            expected[local.origin] = local.origin_seq
    return accepted


def command_events(
    outcome: Decision | Rejection, envelope: CommandEnvelope, first_index: int
) -> list[Event]:
    """The command's events, then its `CommandDecided` (whose index the reply names)."""
    reply: CommandReply
    events: list[Event]
    if isinstance(outcome, Decision):
        events = list(outcome.events)
        reply = CommandAccepted(
            command_id=envelope.command_id,
            created_id=outcome.created_id,
            last_index=first_index + len(events),
        )
    else:
        events = []
        reply = CommandRejected(
            command_id=envelope.command_id, code=outcome.code, message=outcome.message
        )
    events.append(CommandDecided(node_id=envelope.origin, reply=reply))
    return events


def find_decided(
    entries: Sequence[LogEntry], origin: EventOrigin, seq: int
) -> tuple[int, CommandReply] | None:
    """Where the log holds this command's outcome (index, reply), searching backwards."""
    for entry in reversed(entries):
        if entry.origin != origin:
            continue
        if entry.origin_seq < seq:
            return None
        if entry.origin_seq == seq and isinstance(entry.event, CommandDecided):
            return entry.index, entry.event.reply
    return None
