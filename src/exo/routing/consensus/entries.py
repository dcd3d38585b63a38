"""What the replicated log holds: `IndexedEvent`s, the cluster's own events among them.

The cluster events (membership, master election, command outcomes) are part of the
`Event` union (`exo.shared.types.events`) and folded by `apply`, like every other event.
This module adds what only the consensus core needs: the voters derived from the log.
"""

from pydantic import Field

from exo.shared.apply import apply
from exo.shared.types.base import Frozen
from exo.shared.types.events import (
    CommandDecided,
    IndexedEvent,
    MasterElected,
    MemberJoined,
    MemberLeft,
    MemberTimedOut,
)
from exo.shared.types.ids import NodeId

# One entry of the replicated log: exactly the spine's indexed event.
LogEntry = IndexedEvent
ClusterEvent = MemberJoined | MemberLeft | MemberTimedOut | MasterElected | CommandDecided
CLUSTER_EVENTS = (MemberJoined, MemberLeft, MemberTimedOut, MasterElected, CommandDecided)
apply_entry = apply


class Membership(Frozen):
    """The voting members, each with its seniority (the log index of its join)."""

    voters: dict[NodeId, int] = Field(default_factory=dict[NodeId, int])

    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def followed_by(self, entry: LogEntry) -> "Membership":
        match entry.event:
            case MemberJoined(node_id=node_id) if node_id not in self.voters:
                return Membership(voters={**self.voters, node_id: entry.index})
            case MemberLeft(node_id=node_id) | MemberTimedOut(node_id=node_id) if (
                node_id in self.voters
            ):
                return Membership(voters={n: s for n, s in self.voters.items() if n != node_id})
            case _:
                return self


def is_config_change(entry: LogEntry) -> bool:
    return isinstance(entry.event, MemberJoined | MemberLeft | MemberTimedOut)
