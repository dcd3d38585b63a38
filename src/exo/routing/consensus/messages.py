"""What consensus nodes send each other (frozen, strict, JSON on the wire) and persist."""

import base64
import binascii
import zlib
from typing import Annotated, Literal

from pydantic import Field

from exo.routing.consensus.entries import LogEntry, Membership
from exo.shared.types.base import Frozen
from exo.shared.types.commands import CommandEnvelope, CommandReply
from exo.shared.types.events import EventOrigin, LocalEvent
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State


class Snapshot(Frozen):
    """The applied state at `index` and the voters then: replaces the log up to `index`."""

    index: int = Field(ge=-1)
    term: int = Field(ge=0)
    state: State
    members: Membership


class HardState(Frozen):
    """Persist (fsync) before sending any message of the same `Ready`.

    `commit` may lag on disk (a lower commit is safe: it is re-learned from the master);
    term, vote and cluster must not.
    """

    term: int = Field(ge=0)
    voted_for: NodeId | None
    commit: int = Field(ge=-1)
    cluster: str | None


class VoteRequest(Frozen):
    """A (pre-)candidate's claim; `pre_vote` asks without raising anyone's term."""

    kind: Literal["vote_request"] = "vote_request"
    term: int = Field(ge=0)
    last_log_index: int = Field(ge=-1)
    last_log_term: int = Field(ge=0)
    seniority: int = Field(ge=-1)
    pre_vote: bool


class VoteResponse(Frozen):
    kind: Literal["vote_response"] = "vote_response"
    term: int = Field(ge=0)
    granted: bool
    pre_vote: bool


class AppendEntries(Frozen):
    """Entries after `prev_index` (none: a heartbeat) and the master's commit index."""

    kind: Literal["append_entries"] = "append_entries"
    term: int = Field(ge=0)
    prev_index: int = Field(ge=-1)
    prev_term: int = Field(ge=0)
    entries: tuple[LogEntry, ...]
    commit: int = Field(ge=-1)


class AppendResponse(Frozen):
    """`success`: the log matches the master's up to `match_index`. Otherwise a range
    request: send again from `hint_index` (a gap or a conflicting tail)."""

    kind: Literal["append_response"] = "append_response"
    term: int = Field(ge=0)
    success: bool
    match_index: int = Field(ge=-1)
    hint_index: int = Field(ge=0)


class InstallSnapshot(Frozen):
    """One chunk of the master's snapshot at (`index`, `snapshot_term`): the `offset`..
    `offset + len(data)` characters of its encoding (`encode_snapshot`), `total` long.

    A state can outgrow one mesh frame (64 MiB: a few dozen requests in flight, each with
    up to 4 MiB of messages), so the snapshot travels in chunks of at most
    `max_message_bytes`, each acknowledged (`SnapshotAck`) before the next is sent.
    """

    kind: Literal["install_snapshot"] = "install_snapshot"
    term: int = Field(ge=0)
    index: int = Field(ge=-1)
    snapshot_term: int = Field(ge=0)
    offset: int = Field(ge=0)
    total: int = Field(ge=1)
    data: str


class SnapshotAck(Frozen):
    """A follower holds the first `received` characters of the snapshot at `index`: the
    master sends the chunk that follows (0: start again, e.g. it held another snapshot)."""

    kind: Literal["snapshot_ack"] = "snapshot_ack"
    term: int = Field(ge=0)
    index: int = Field(ge=-1)
    received: int = Field(ge=0)


def encode_snapshot(snapshot: Snapshot) -> str:
    """A snapshot as ASCII for `InstallSnapshot` chunks: its JSON, compressed (a state of
    requests' messages and telemetry shrinks several times), in base64."""
    compressed = zlib.compress(snapshot.model_dump_json().encode(), level=1)
    return base64.b64encode(compressed).decode("ascii")


def decode_snapshot(text: str) -> Snapshot:
    """The snapshot `encode_snapshot` gave; ValueError when `text` is not one."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (binascii.Error, zlib.error, UnicodeEncodeError) as exc:
        raise ValueError(f"not an encoded snapshot: {exc}") from exc
    return Snapshot.model_validate_json(raw)


class ForwardLocalEvents(Frozen):
    """A producer's un-indexed local events, in origin_seq order, to the master."""

    kind: Literal["forward_local_events"] = "forward_local_events"
    events: tuple[LocalEvent, ...]


class SequencedCommand(Frozen):
    seq: int = Field(ge=0)
    envelope: CommandEnvelope


class ForwardCommands(Frozen):
    """All of a node's unanswered commands, in seq order, to the master."""

    kind: Literal["forward_commands"] = "forward_commands"
    origin: EventOrigin
    commands: tuple[SequencedCommand, ...]


class CommandReplies(Frozen):
    kind: Literal["command_replies"] = "command_replies"
    replies: tuple[CommandReply, ...]


class JoinRequest(Frozen):
    """From a node outside the voters: replicate to me, and make me a voter once caught up."""

    kind: Literal["join_request"] = "join_request"
    last_index: int = Field(ge=-1)


class LeaveRequest(Frozen):
    kind: Literal["leave_request"] = "leave_request"


ConsensusMessage = Annotated[
    VoteRequest
    | VoteResponse
    | AppendEntries
    | AppendResponse
    | InstallSnapshot
    | SnapshotAck
    | ForwardLocalEvents
    | ForwardCommands
    | CommandReplies
    | JoinRequest
    | LeaveRequest,
    Field(discriminator="kind"),
]


class Packet(Frozen):
    """One message between two nodes. `cluster` is None only from a node that has never
    been in a cluster; a packet from another cluster is dropped (never merged)."""

    cluster: str | None
    sender: NodeId
    to: NodeId
    message: ConsensusMessage
