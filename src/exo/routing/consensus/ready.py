"""What the caller does after feeding the core: persist, then send, then apply."""

from collections.abc import Sequence
from dataclasses import dataclass

from exo.routing.consensus.entries import LogEntry
from exo.routing.consensus.messages import HardState, Packet, Snapshot
from exo.shared.types.commands import CommandReply


@dataclass(frozen=True)
class Ready:
    """Drained by `ConsensusNode.ready()`. Handle the fields in this order:

    1. `snapshot` with `snapshot_resets_log`: a snapshot from the master replaces the
       whole log (drop every persisted entry; the log continues at snapshot.index + 1).
    2. `truncate_after`: drop persisted entries with a greater index (a deposed master's
       uncommitted tail; never a committed entry).
    3. `entries`: append them (they follow what is left).
    4. `snapshot` without `snapshot_resets_log`: this node's own checkpoint; write it,
       then entries up to `compact_upto` may be dropped.
    5. `hard_state`: write it.
    Make 1-5 durable (one fsync) before 6.
    6. send `messages`; then act on `committed` (already applied to `node.state`, in
       index order) and deliver `replies` to this node's API.
    """

    snapshot: Snapshot | None = None
    snapshot_resets_log: bool = False
    compact_upto: int | None = None
    truncate_after: int | None = None
    entries: tuple[LogEntry, ...] = ()
    hard_state: HardState | None = None
    messages: tuple[Packet, ...] = ()
    committed: tuple[LogEntry, ...] = ()
    replies: tuple[CommandReply, ...] = ()

    def is_empty(self) -> bool:
        return (
            self.snapshot is None
            and self.truncate_after is None
            and not self.entries
            and self.hard_state is None
            and not self.messages
            and not self.committed
            and not self.replies
        )


@dataclass(frozen=True)
class Restored:
    """What a restarted node read back from disk: the last hard state, the latest
    snapshot, and the persisted entries (those at or below the snapshot are skipped)."""

    hard_state: HardState
    snapshot: Snapshot | None
    entries: Sequence[LogEntry]
