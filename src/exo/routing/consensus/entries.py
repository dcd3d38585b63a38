"""What the replicated log holds: the spine's events plus the cluster's own events.

The cluster events (membership, master election, command outcomes) belong in the
`Event` union of `exo.shared.types.events`; until the lead moves them there, `LogEntry`
is `IndexedEvent` with the union widened, and `apply_entry` folds the cluster events
next to the spine's `apply`. Once they are in `Event`: `LogEntry = IndexedEvent`,
`apply_entry = apply` (with `_apply_cluster_event`'s cases moved into apply.py).
"""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.apply import ApplyError, apply
from exo.shared.types.base import Frozen
from exo.shared.types.commands import CommandReply
from exo.shared.types.events import Event, EventOrigin, IndexedEvent
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State


class MemberJoined(Frozen):
    """A node became a voting member (after it caught up with the log)."""

    kind: Literal["member_joined"] = "member_joined"
    node_id: NodeId


class MemberLeft(Frozen):
    """A node asked to leave; it no longer votes or counts towards a quorum."""

    kind: Literal["member_left"] = "member_left"
    node_id: NodeId


class MemberTimedOut(Frozen):
    """The master heard nothing from a member for the timeout; it stops counting it."""

    kind: Literal["member_timed_out"] = "member_timed_out"
    node_id: NodeId
    silent_ms: int = Field(ge=0)


class MasterElected(Frozen):
    """First entry of every master's term (raft's no-op): commits the tail it inherited."""

    kind: Literal["master_elected"] = "master_elected"
    node_id: NodeId
    term: int = Field(ge=1)


class CommandDecided(Frozen):
    """A command's outcome, after its events: makes commands exactly-once across failover."""

    kind: Literal["command_decided"] = "command_decided"
    # The node whose API sent the command: the master sends it the reply on commit.
    node_id: NodeId
    reply: CommandReply


ClusterEvent = Annotated[
    MemberJoined | MemberLeft | MemberTimedOut | MasterElected | CommandDecided,
    Field(discriminator="kind"),
]
CLUSTER_EVENTS = (MemberJoined, MemberLeft, MemberTimedOut, MasterElected, CommandDecided)


class LogEntry(Frozen):
    """`IndexedEvent` whose event may also be a cluster event (same fields, same JSON)."""

    index: int = Field(ge=0)
    term: int = Field(ge=0)
    origin: EventOrigin
    origin_seq: int = Field(ge=0)
    event: Event | ClusterEvent


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


def apply_entry(state: State, entry: LogEntry) -> State:
    """`apply` for a log entry: the spine's events through `apply`, cluster events here."""
    event = entry.event
    if not isinstance(event, CLUSTER_EVENTS):
        return apply(
            state,
            IndexedEvent(
                index=entry.index,
                term=entry.term,
                origin=entry.origin,
                origin_seq=entry.origin_seq,
                event=event,
            ),
        )
    if entry.index != state.last_index + 1:
        raise ApplyError(f"event index {entry.index} does not follow {state.last_index}")
    if entry.term < state.term:
        raise ApplyError(f"event term {entry.term} is older than {state.term}")
    state = _apply_cluster_event(state, event)
    origin_seqs = dict(state.origin_seqs)
    origin_seqs[entry.origin] = max(origin_seqs.get(entry.origin, -1), entry.origin_seq)
    return state.model_copy(
        update={"last_index": entry.index, "term": entry.term, "origin_seqs": origin_seqs}
    )


def _apply_cluster_event(
    state: State,
    event: MemberJoined | MemberLeft | MemberTimedOut | MasterElected | CommandDecided,
) -> State:
    """What apply.py must do with the cluster events (State has no master/voters yet)."""
    match event:
        case (
            MemberJoined(node_id=node_id)
            | MemberLeft(node_id=node_id)
            | MemberTimedOut(node_id=node_id)
        ):
            info = state.nodes.get(node_id)
            if info is None:
                return state
            status = "up" if isinstance(event, MemberJoined) else "down"
            nodes = {**state.nodes, node_id: info.model_copy(update={"status": status})}
            return state.model_copy(update={"nodes": nodes})
        case MasterElected() | CommandDecided():
            return state
