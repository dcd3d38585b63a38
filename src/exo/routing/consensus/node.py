"""One node's consensus state machine: no I/O, no clock, no randomness of its own.

The caller feeds it `receive(packet)`, `tick()`, `submit_local_events`, `submit_command`,
then drains `ready()`: what to persist, what to send, what was committed. Raft with
pre-vote and check-quorum; membership changes one voter at a time, from the log.

Acknowledged = committed: an entry stored on a quorum of the voters, counted by the
master for an entry of its own term (earlier entries commit with it). Only committed
entries are applied (on every node), turn into command replies, or free a producer's
local event. A committed entry is never lost while a quorum of voters keeps its disk:
a voter grants its vote only to a candidate whose log is at least as complete as its
own (last entry's term, then last index), and any quorum that elects meets any quorum
that stored the entry.
"""

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from exo.master.decide import Decision, Rejection
from exo.routing.consensus.config import ConsensusConfig
from exo.routing.consensus.entries import (
    CommandDecided,
    LogEntry,
    MasterElected,
    MemberJoined,
    MemberLeft,
    Membership,
    MemberTimedOut,
    apply_entry,
    is_config_change,
)
from exo.routing.consensus.intake import command_events, find_decided, in_order_new
from exo.routing.consensus.log import RaftLog
from exo.routing.consensus.messages import (
    AppendEntries,
    AppendResponse,
    CommandReplies,
    ConsensusMessage,
    ForwardCommands,
    ForwardLocalEvents,
    HardState,
    InstallSnapshot,
    JoinRequest,
    LeaveRequest,
    Packet,
    Snapshot,
    SnapshotAck,
    VoteRequest,
    VoteResponse,
    decode_snapshot,
    encode_snapshot,
)
from exo.routing.consensus.outbox import Outbox
from exo.routing.consensus.ready import Ready, Restored
from exo.shared.types.commands import (
    CommandEnvelope,
    CommandRejected,
    CommandReply,
)
from exo.shared.types.events import Event, EventOrigin, LocalEvent
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State

Role = Literal["follower", "pre_candidate", "candidate", "leader"]
# The master's pure command handler (`exo.master.decide.decide` with its context bound),
# given the state with every entry the master holds applied.
Decider = Callable[[State, CommandEnvelope], Decision | Rejection]


class Claim(NamedTuple):
    """How candidates compare. Voters enforce the first two (a vote only for a log at
    least as complete as their own: what keeps committed entries); seniority (earlier
    join) and node id only order equally complete candidates' election timeouts."""

    log_term: int
    log_index: int
    seniority: int  # minus the join index: the earlier joined, the greater
    node_id: str


@dataclass
class _Progress:
    next_index: int
    match_index: int
    last_heard: int
    # While the follower needs the snapshot: when a chunk was last sent (a silent follower
    # gets it again after an election timeout) and how much of it the follower holds.
    snapshot_sent: int | None = None
    snapshot_index: int = -1
    snapshot_offset: int = 0


@dataclass
class _Incoming:
    """A follower's snapshot in transfer: the chunks received so far, in order."""

    index: int
    term: int
    total: int
    chunks: list[str]

    @property
    def received(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


class ConsensusNode:
    def __init__(
        self,
        node_id: NodeId,
        *,
        origin: EventOrigin,
        rng: random.Random,
        decide: Decider,
        config: ConsensusConfig | None = None,
        peers: Iterable[NodeId] = (),
        restored: Restored | None = None,
    ) -> None:
        self.node_id = node_id
        self._cfg = config or ConsensusConfig()
        self._rng = rng
        self._decide = decide
        self._master_origin: EventOrigin = f"{origin}/master"
        self._peers = set(peers) - {node_id}
        self.term = 0
        self.voted_for: NodeId | None = None
        self.cluster: str | None = None
        self.role: Role = "follower"
        self.master: NodeId | None = None
        self.commit = -1
        self.state = State()
        self._log = RaftLog()
        self._snapshot: Snapshot | None = None
        # The master's snapshot encoded for InstallSnapshot chunks (encoded when first sent).
        self._snapshot_wire: tuple[Snapshot, str] | None = None
        self._incoming: _Incoming | None = None
        self._committed_members = Membership()
        self.members = Membership()
        self._now = 0
        self._election_elapsed = 0
        self._timeout = self._cfg.election_ticks
        self._heartbeat_elapsed = 0
        self._master_heard = -(10**9)
        self._last_join = -(10**9)
        self._votes: dict[NodeId, bool] = {}
        self._progress: dict[NodeId, _Progress] = {}
        self._tip: State | None = None
        self._leaving = False
        self._left = False
        self._departed: set[NodeId] = set()  # master: nodes that left; never re-promoted
        self._replicate = False
        self.foreign_packets = 0
        # Accumulated until the next `ready()`.
        self._out_messages: list[Packet] = []
        self._out_entries: list[LogEntry] = []
        self._out_truncate: int | None = None
        self._out_snapshot: Snapshot | None = None
        self._out_resets = False
        self._out_compact: int | None = None
        self._out_committed: list[LogEntry] = []
        self._out_replies: list[CommandReply] = []
        self._hard_dirty = False
        command_origin: EventOrigin = f"{origin}/commands"
        self._outbox = Outbox(
            command_origin, 0, self._cfg.max_append_entries, self._cfg.max_message_bytes
        )
        if restored is not None:
            self._restore(restored)
            self._outbox.resume_after(self._tip_state().origin_seqs.get(command_origin, -1))
        self._reset_election_timer()

    # ----------------------------------------------------------------- public API

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def is_master(self) -> bool:
        return self.role == "leader"

    def claim(self) -> Claim:
        join = self.members.voters.get(self.node_id)
        seniority = -join if join is not None else -(10**9)
        return Claim(self._log.last_term, self._log.last_index, seniority, self.node_id)

    def entries(self, start: int, end: int) -> list[LogEntry]:
        """Held entries in [start, end) (entries compacted into the snapshot are gone)."""
        return self._log.slice(start, end)

    def set_peers(self, peers: Iterable[NodeId]) -> None:
        """Nodes discovery knows of; joins and elections also ask them."""
        self._peers = set(peers) - {self.node_id}

    def bootstrap(self, cluster: str) -> None:
        """Found a new one-voter cluster (only a node that never held a log may)."""
        if self.cluster is not None or self._log.last_index >= 0:
            raise RuntimeError("only a node with an empty log can found a cluster")
        self.cluster = cluster
        self.term = 1
        self.voted_for = self.node_id
        self._hard_dirty = True
        self._append_own([MemberJoined(node_id=self.node_id)])
        self._become_leader()

    def leave(self) -> None:
        """Ask the master to remove this node from the voters (retried until committed)."""
        self._leaving = True

    def submit_local_events(self, events: Sequence[LocalEvent]) -> None:
        """This node's producers' events; kept and re-sent until indexed and committed."""
        self._outbox.add_events(list(events), self.state)

    def submit_command(self, envelope: CommandEnvelope) -> None:
        """Forwarded to the master; its reply comes back in `Ready.replies` (or a
        rejection once `command_timeout_ticks` pass without one)."""
        self._outbox.add_command(envelope, self._now + self._cfg.command_timeout_ticks)

    def tick(self) -> None:
        self._now += 1
        if self.role == "leader":
            self._tick_master()
        else:
            self._tick_follower()
        if self._now % self._cfg.resend_ticks == 0 and self._leaving:
            self._request_leave()
        for rejection in self._outbox.expire(self._now, self.master is not None):
            self._out_replies.append(rejection)

    def receive(self, packet: Packet) -> None:
        if packet.to != self.node_id:
            return
        if packet.cluster is not None and self.cluster not in (None, packet.cluster):
            self.foreign_packets += 1
            return
        sender, message = packet.sender, packet.message
        match message:
            case ForwardLocalEvents(events=events):
                if self.role == "leader":
                    self._propose_local_events(events)
            case ForwardCommands():
                if self.role == "leader":
                    self._propose_commands(message)
            case CommandReplies(replies=replies):
                for reply in replies:
                    self._answer(reply)
            case JoinRequest():
                if self.role == "leader" and packet.cluster in (None, self.cluster):
                    self._departed.discard(sender)
                    self._add_learner(sender)
            case LeaveRequest():
                if self.role == "leader":
                    self._departed.add(sender)
                    self._add_learner(sender)  # until it learns its removal committed
                    self._propose_config(MemberLeft(node_id=sender))
            case _:
                self._step(sender, packet.cluster, message)

    def ready(self) -> Ready:
        self._flush_outbox()
        if self.role == "leader" and self._replicate:
            self._replicate = False
            window = 4 * self._cfg.max_append_entries
            for node, progress in list(self._progress.items()):
                if progress.next_index - progress.match_index - 1 < window:
                    self._send_append(node)
        hard = None
        if self._hard_dirty:
            hard = HardState(
                term=self.term, voted_for=self.voted_for, commit=self.commit, cluster=self.cluster
            )
        ready = Ready(
            snapshot=self._out_snapshot,
            snapshot_resets_log=self._out_resets,
            compact_upto=self._out_compact,
            truncate_after=self._out_truncate,
            entries=tuple(self._out_entries),
            hard_state=hard,
            messages=tuple(self._out_messages),
            committed=tuple(self._out_committed),
            replies=tuple(self._out_replies),
        )
        self._out_messages, self._out_entries, self._out_committed = [], [], []
        self._out_replies, self._out_truncate, self._out_snapshot = [], None, None
        self._out_resets, self._out_compact, self._hard_dirty = False, None, False
        return ready

    # ------------------------------------------------------------------ restore

    def _restore(self, restored: Restored) -> None:
        hard = restored.hard_state
        self.term, self.voted_for, self.cluster = hard.term, hard.voted_for, hard.cluster
        snapshot = restored.snapshot
        if snapshot is not None:
            self._snapshot = snapshot
            self._log.reset(snapshot.index, snapshot.term)
            self.state = snapshot.state
            self._committed_members = snapshot.members
            self.commit = snapshot.index
        self._log.append([e for e in restored.entries if e.index > self._log.last_index])
        self.members = self._fold_members()
        self._commit_to(min(hard.commit, self._log.last_index))

    # -------------------------------------------------------------------- ticks

    def _tick_master(self) -> None:
        self._master_heard = self._now
        self._heartbeat_elapsed += 1
        if self._heartbeat_elapsed >= self._cfg.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            for node, progress in list(self._progress.items()):
                progress.next_index = progress.match_index + 1  # re-send what is unacked
                self._send_append(node)
        if self._now % self._cfg.election_ticks == 0 and not self._has_quorum_contact():
            self._become_follower(self.term, None)
            return
        self._maintain_members()

    def _tick_follower(self) -> None:
        self._election_elapsed += 1
        if self.node_id in self.members.voters and not self._leaving:
            if self._election_elapsed >= self._timeout:
                self._start_pre_vote()
        elif (
            not (self._left or self._leaving)
            and not self._in_lease()
            and self._now - self._last_join >= self._cfg.join_retry_ticks
        ):
            self._last_join = self._now
            for peer in sorted(self._peers):
                self._send(peer, JoinRequest(last_index=self._log.last_index))

    def _in_lease(self) -> bool:
        """Heard from a live master within the minimum election timeout."""
        if self.role == "leader":
            return True
        return self.master is not None and (
            self._now - self._master_heard < self._cfg.election_ticks
        )

    def _has_quorum_contact(self) -> bool:
        heard = sum(
            1
            for node in self.members.voters
            if node == self.node_id
            or (
                node in self._progress
                and self._now - self._progress[node].last_heard < self._cfg.election_ticks
            )
        )
        return heard >= self.members.quorum()

    def _reset_election_timer(self) -> None:
        self._election_elapsed = 0
        # Equally complete candidates: the more senior tends to time out first.
        ranked = sorted(self.members.voters.items(), key=lambda kv: (kv[1], kv[0]))
        rank = next((i for i, (n, _) in enumerate(ranked) if n == self.node_id), 0)
        stagger = min(rank, self._cfg.election_ticks // 2)
        self._timeout = (
            self._cfg.election_ticks + stagger + self._rng.randrange(self._cfg.election_ticks)
        )

    # ----------------------------------------------------------------- election

    def _step(self, sender: NodeId, cluster: str | None, message: ConsensusMessage) -> None:
        term = _term_of(message)
        if term > self.term:
            if isinstance(message, VoteRequest) and message.pre_vote:
                pass  # a pre-vote raises nobody's term
            elif isinstance(message, VoteResponse) and message.pre_vote and message.granted:
                pass
            elif isinstance(message, AppendEntries | InstallSnapshot):
                self._become_follower(term, sender)
            else:
                self._become_follower(term, None)
        elif term < self.term:
            if isinstance(message, AppendEntries | InstallSnapshot):
                self._send(
                    sender,
                    AppendResponse(term=self.term, success=False, match_index=-1, hint_index=0),
                )
            elif isinstance(message, VoteRequest):
                self._send(
                    sender, VoteResponse(term=self.term, granted=False, pre_vote=message.pre_vote)
                )
            return
        match message:
            case VoteRequest():
                self._on_vote_request(sender, message)
            case VoteResponse():
                self._on_vote_response(sender, message)
            case AppendEntries():
                self._on_append(sender, cluster, message)
            case InstallSnapshot():
                self._on_snapshot(sender, cluster, message)
            case SnapshotAck():
                if self.role == "leader" and message.term == self.term:
                    self._on_snapshot_ack(sender, message)
            case AppendResponse():
                if self.role == "leader" and message.term == self.term:
                    self._on_append_response(sender, message)
            case _:
                pass

    def _on_vote_request(self, sender: NodeId, request: VoteRequest) -> None:
        complete = (request.last_log_term, request.last_log_index) >= (
            self._log.last_term,
            self._log.last_index,
        )
        if self.role == "leader" and sender not in self.members.voters.keys() | self._departed:
            self._add_learner(sender)  # a removed node that missed its removal
        if request.pre_vote:
            grant = request.term > self.term and complete and not self._in_lease()
            self._send(
                sender,
                VoteResponse(
                    term=request.term if grant else self.term, granted=grant, pre_vote=True
                ),
            )
            return
        # Only a voter by its own log votes. A node that has never joined has nothing to
        # vote with, and one that lost its disk (its log moved aside) may already have voted
        # in this term: refusing is always safe, a second vote is not.
        voter = self.node_id in self.members.voters
        grant = complete and voter and self.voted_for in (None, sender) and self.role != "leader"
        if grant:
            self.voted_for = sender
            self._hard_dirty = True
            self._reset_election_timer()
        self._send(sender, VoteResponse(term=self.term, granted=grant, pre_vote=False))

    def _on_vote_response(self, sender: NodeId, response: VoteResponse) -> None:
        if response.pre_vote and self.role == "pre_candidate":
            if response.granted and response.term != self.term + 1:
                return
        elif not (not response.pre_vote and self.role == "candidate"):
            return
        if sender not in self.members.voters:
            return
        self._votes[sender] = response.granted
        granted = sum(1 for g in self._votes.values() if g)
        if granted >= self.members.quorum():
            if self.role == "pre_candidate":
                self._campaign()
            else:
                self._become_leader()
        elif len(self._votes) - granted >= self.members.quorum():
            self._become_follower(self.term, None)

    def _start_pre_vote(self) -> None:
        self.role = "pre_candidate"
        self.master = None
        self._votes = {self.node_id: True}
        self._reset_election_timer()
        if len(self.members.voters) == 1:
            self._campaign()
            return
        self._ask_votes(pre_vote=True)

    def _campaign(self) -> None:
        self.role = "candidate"
        self.term += 1
        self.voted_for = self.node_id
        self._hard_dirty = True
        self._votes = {self.node_id: True}
        self._reset_election_timer()
        if self.members.quorum() <= 1:
            self._become_leader()
            return
        self._ask_votes(pre_vote=False)

    def _ask_votes(self, *, pre_vote: bool) -> None:
        request = VoteRequest(
            term=self.term + 1 if pre_vote else self.term,
            last_log_index=self._log.last_index,
            last_log_term=self._log.last_term,
            seniority=self.members.voters.get(self.node_id, -1),
            pre_vote=pre_vote,
        )
        for node in sorted((set(self.members.voters) | self._peers) - {self.node_id}):
            self._send(node, request)

    def _become_follower(self, term: int, master: NodeId | None) -> None:
        if term > self.term:
            self.term = term
            self.voted_for = None
            self._hard_dirty = True
        self.role = "follower"
        self._progress.clear()
        self._votes.clear()
        self._tip = None
        self._set_master(master)
        self._reset_election_timer()

    def _set_master(self, master: NodeId | None) -> None:
        if master is not None:
            self._master_heard = self._now
        if master != self.master:
            self.master = master
            if master is not None:
                self._outbox.resend_all()

    def _become_leader(self) -> None:
        self.role = "leader"
        self._votes.clear()
        self._heartbeat_elapsed = 0
        self._progress = {
            node: _Progress(self._log.last_index + 1, -1, self._now)
            for node in self.members.voters
            if node != self.node_id
        }
        self._set_master(self.node_id)
        self._append_own([MasterElected(node_id=self.node_id, term=self.term)])

    # -------------------------------------------------------------- replication

    def _send_append(self, node: NodeId) -> None:
        progress = self._progress[node]
        if progress.next_index <= self._log.base_index:
            due = progress.snapshot_sent is None or (
                self._now - progress.snapshot_sent >= self._cfg.election_ticks
            )
            if due:
                self._send_snapshot_chunk(node, progress)
            return
        prev = progress.next_index - 1
        prev_term = self._log.term_at(prev)
        assert prev_term is not None
        entries = self._log.slice(
            progress.next_index,
            progress.next_index + self._cfg.max_append_entries,
            self._cfg.max_message_bytes,
        )
        self._send(
            node,
            AppendEntries(
                term=self.term,
                prev_index=prev,
                prev_term=prev_term,
                entries=tuple(entries),
                commit=self.commit,
            ),
        )
        progress.next_index = prev + 1 + len(entries)

    def _send_snapshot_chunk(self, node: NodeId, progress: _Progress) -> None:
        snapshot = self._snapshot
        if snapshot is None:
            raise RuntimeError("log compacted without a snapshot")
        if self._snapshot_wire is None or self._snapshot_wire[0] is not snapshot:
            self._snapshot_wire = (snapshot, encode_snapshot(snapshot))
        wire = self._snapshot_wire[1]
        if progress.snapshot_index != snapshot.index or progress.snapshot_offset >= len(wire):
            progress.snapshot_index, progress.snapshot_offset = snapshot.index, 0
        offset = progress.snapshot_offset
        progress.snapshot_sent = self._now
        self._send(
            node,
            InstallSnapshot(
                term=self.term,
                index=snapshot.index,
                snapshot_term=snapshot.term,
                offset=offset,
                total=len(wire),
                data=wire[offset : offset + self._cfg.max_message_bytes],
            ),
        )

    def _on_snapshot_ack(self, sender: NodeId, ack: SnapshotAck) -> None:
        progress = self._progress.get(sender)
        if progress is None or progress.next_index > self._log.base_index:
            return  # it no longer needs a snapshot (a late or duplicate ack)
        progress.last_heard = self._now
        if self._snapshot is not None and ack.index == self._snapshot.index:
            progress.snapshot_index, progress.snapshot_offset = ack.index, ack.received
        else:
            progress.snapshot_offset = 0  # it held another snapshot than the one there is now
        self._send_snapshot_chunk(sender, progress)

    def _on_append_response(self, sender: NodeId, response: AppendResponse) -> None:
        progress = self._progress.get(sender)
        if progress is None:
            return
        progress.last_heard = self._now
        if response.success:
            progress.match_index = max(progress.match_index, response.match_index)
            progress.next_index = max(progress.next_index, progress.match_index + 1)
            if progress.snapshot_sent is not None and progress.match_index >= self._log.base_index:
                progress.snapshot_sent, progress.snapshot_offset = None, 0
            self._advance_commit()
            if progress.next_index <= self._log.last_index:
                self._send_append(sender)
            return
        hint = min(max(response.hint_index, progress.match_index + 1), self._log.last_index + 1)
        progress.next_index = hint
        self._send_append(sender)

    def _advance_commit(self) -> None:
        matches = sorted(
            (
                self._log.last_index
                if node == self.node_id
                else self._progress[node].match_index
                if node in self._progress
                else -1
                for node in self.members.voters
            ),
            reverse=True,
        )
        if not matches:
            return
        index = matches[self.members.quorum() - 1]
        if index > self.commit and self._log.term_at(index) == self.term:
            self._commit_to(index)

    def _on_append(self, sender: NodeId, cluster: str | None, append: AppendEntries) -> None:
        self._follow(sender, cluster)
        prev, entries = append.prev_index, append.entries
        if prev < self.commit:  # committed entries match the master's: skip them
            entries = entries[self.commit - prev :]
            prev = self.commit
        elif self._log.term_at(prev) != append.prev_term:
            if prev > self._log.last_index:
                hint = self._log.last_index + 1
            else:
                hint = self._log.first_index_of_term(prev, self.commit)
            self._send(
                sender,
                AppendResponse(term=self.term, success=False, match_index=-1, hint_index=hint),
            )
            return
        for i, entry in enumerate(entries):
            held = self._log.term_at(entry.index)
            if held == entry.term:
                continue
            if held is not None:
                self._truncate_after(entry.index - 1)
            self._append(list(entries[i:]))
            break
        last_new = prev + len(entries)
        if min(append.commit, last_new) > self.commit:
            self._commit_to(min(append.commit, last_new))
        self._send(
            sender,
            AppendResponse(
                term=self.term, success=True, match_index=last_new, hint_index=last_new + 1
            ),
        )

    def _on_snapshot(self, sender: NodeId, cluster: str | None, chunk: InstallSnapshot) -> None:
        self._follow(sender, cluster)
        if chunk.index > self.commit:
            if self._log.term_at(chunk.index) == chunk.snapshot_term:
                self._incoming = None
                self._commit_to(chunk.index)  # it holds those entries: no transfer needed
            else:
                snapshot = self._receive_chunk(chunk)
                if snapshot is None:
                    received = self._incoming.received if self._incoming is not None else 0
                    self._send(
                        sender, SnapshotAck(term=self.term, index=chunk.index, received=received)
                    )
                    return
                self._install(snapshot)
        self._send(
            sender,
            AppendResponse(
                term=self.term, success=True, match_index=self.commit, hint_index=self.commit + 1
            ),
        )

    def _receive_chunk(self, chunk: InstallSnapshot) -> Snapshot | None:
        """The whole snapshot once `chunk` completes it, else None (`_incoming` then says
        how much is held: the master sends on from there)."""
        incoming = self._incoming
        if incoming is None or (incoming.index, incoming.term, incoming.total) != (
            chunk.index,
            chunk.snapshot_term,
            chunk.total,
        ):
            if chunk.offset != 0:
                self._incoming = None  # a chunk of a snapshot it never began: from the start
                return None
            incoming = self._incoming = _Incoming(chunk.index, chunk.snapshot_term, chunk.total, [])
        if chunk.offset != incoming.received or not chunk.data:
            return None  # a duplicate or a stray: ask for what follows what it holds
        incoming.chunks.append(chunk.data)
        if incoming.received < incoming.total:
            return None
        self._incoming = None
        try:
            snapshot = decode_snapshot("".join(incoming.chunks))
        except ValueError:
            return None  # not what the master encoded: ask for it again from the start
        if (snapshot.index, snapshot.term) != (chunk.index, chunk.snapshot_term):
            return None
        return snapshot

    def _follow(self, master: NodeId, cluster: str | None) -> None:
        if self.role != "follower":
            self._become_follower(self.term, master)
        self._set_master(master)
        self._election_elapsed = 0
        if self.cluster is None and cluster is not None:
            self.cluster = cluster
            self._hard_dirty = True

    def _install(self, snapshot: Snapshot) -> None:
        self._log.reset(snapshot.index, snapshot.term)
        self._snapshot = snapshot
        self.state = snapshot.state
        self._committed_members = snapshot.members
        self.members = snapshot.members
        self.commit = snapshot.index
        self._tip = None
        self._hard_dirty = True
        self._out_snapshot, self._out_resets, self._out_compact = snapshot, True, None
        self._out_entries, self._out_truncate = [], None
        self._outbox.prune(self.state)

    # -------------------------------------------------------------- the log

    def _append(self, entries: list[LogEntry]) -> None:
        self._log.append(entries)
        self._out_entries.extend(entries)
        for entry in entries:
            self.members = self.members.followed_by(entry)

    def _truncate_after(self, index: int) -> None:
        if index < self.commit:
            raise RuntimeError(f"refusing to truncate committed entries ({index} < {self.commit})")
        self._log.truncate_after(index)
        self._out_entries = [e for e in self._out_entries if e.index <= index]
        if self._out_truncate is None or index < self._out_truncate:
            self._out_truncate = index
        self.members = self._fold_members()
        self._tip = None

    def _fold_members(self) -> Membership:
        members = self._committed_members
        for entry in self._log.slice(self.commit + 1, self._log.last_index + 1):
            members = members.followed_by(entry)
        return members

    def _commit_to(self, index: int) -> None:
        replies: dict[NodeId, list[CommandReply]] = defaultdict(list)
        for entry in self._log.slice(self.commit + 1, index + 1):
            self.state = apply_entry(self.state, entry)
            self._committed_members = self._committed_members.followed_by(entry)
            self._out_committed.append(entry)
            if isinstance(entry.event, CommandDecided):
                if entry.origin == self._outbox.command_origin:
                    self._answer(entry.event.reply)
                elif self.role == "leader":
                    replies[entry.event.node_id].append(entry.event.reply)
        if index <= self.commit:
            return
        self.commit = index
        self._hard_dirty = True
        self._outbox.prune(self.state)
        for node, batch in sorted(replies.items()):
            if node != self.node_id:
                self._send(node, CommandReplies(replies=tuple(batch)))
        self._maybe_snapshot()
        if self.role == "leader" and self.node_id not in self._committed_members.voters:
            self._become_follower(self.term, None)  # it committed its own removal

    def _maybe_snapshot(self) -> None:
        previous = self._snapshot.index if self._snapshot is not None else -1
        if self.commit - previous < self._cfg.snapshot_every:
            return
        term = self._log.term_at(self.commit)
        assert term is not None
        self._snapshot = Snapshot(
            index=self.commit, term=term, state=self.state, members=self._committed_members
        )
        self._out_snapshot = self._snapshot
        if previous > self._log.base_index:  # keep the entries since the previous snapshot
            self._log.compact(previous)
            self._out_compact = previous

    def _tip_state(self) -> State:
        """The committed state with every held entry applied: what the master decides on."""
        tip = self._tip
        if tip is None or tip.last_index < self.commit:
            tip = self.state
        for entry in self._log.slice(tip.last_index + 1, self._log.last_index + 1):
            tip = apply_entry(tip, entry)
        self._tip = tip
        return tip

    # ------------------------------------------------------------- proposals

    def _append_own(
        self,
        events: Sequence[Event],
        origin: EventOrigin | None = None,
        seq: int | None = None,
    ) -> int:
        """Index this master's events; returns the last index. One (origin, seq) for all."""
        origin = origin or self._master_origin
        next_seq = self._tip_state().origin_seqs.get(origin, -1) + 1
        start = self._log.last_index + 1
        entries = [
            LogEntry(
                index=start + i,
                term=self.term,
                origin=origin,
                origin_seq=next_seq + i if seq is None else seq,
                event=event,
            )
            for i, event in enumerate(events)
        ]
        self._append(entries)
        self._replicate = True
        self._advance_commit()
        return self._log.last_index

    def _propose_local_events(self, events: Sequence[LocalEvent]) -> None:
        accepted = in_order_new(self._tip_state().origin_seqs, events)
        if not accepted:
            return
        start = self._log.last_index + 1
        self._append(
            [
                LogEntry(
                    index=start + i,
                    term=self.term,
                    origin=e.origin,
                    origin_seq=e.origin_seq,
                    event=e.event,
                )
                for i, e in enumerate(accepted)
            ]
        )
        self._replicate = True
        self._advance_commit()

    def _propose_commands(self, forwarded: ForwardCommands) -> None:
        """Decide each command once: its events and a `CommandDecided` share its
        (origin, seq), so a re-sent command finds its outcome in the log instead."""
        for command in sorted(forwarded.commands, key=lambda c: c.seq):
            envelope = command.envelope
            done = self._tip_state().origin_seqs.get(forwarded.origin, -1)
            if command.seq <= done:
                held = self._log.slice(self._log.base_index + 1, self._log.last_index + 1)
                decided = find_decided(held, forwarded.origin, command.seq)
                if decided is None:
                    message = "decided long ago; its outcome is compacted into the state"
                    self._reply(
                        envelope.origin,
                        CommandRejected(
                            command_id=envelope.command_id, code="unavailable", message=message
                        ),
                    )
                elif decided[0] <= self.commit:  # uncommitted: replied to on commit
                    self._reply(envelope.origin, decided[1])
                continue
            if command.seq != done + 1:
                return  # a gap: wait for the re-send
            try:
                outcome = self._decide(self._tip_state(), envelope)
            except Exception as exc:  # a bug must reject the command, not stop the master
                outcome = Rejection(code="invalid", message=f"{type(exc).__name__}: {exc}")
            events = command_events(outcome, envelope, self._log.last_index + 1)
            self._append_own(events, origin=forwarded.origin, seq=command.seq)

    def _reply(self, node: NodeId, reply: CommandReply) -> None:
        if node == self.node_id:
            self._answer(reply)
        else:
            self._send(node, CommandReplies(replies=(reply,)))

    def _answer(self, reply: CommandReply) -> None:
        if self._outbox.answered(reply):
            self._out_replies.append(reply)

    def _flush_outbox(self) -> None:
        if self.master is None:
            return
        events = self._outbox.due_events(self._now, self._cfg.resend_ticks)
        commands = self._outbox.due_commands(self._now, self._cfg.resend_ticks)
        for message in (events, commands):
            if message is None:
                continue
            if self.role == "leader":
                if isinstance(message, ForwardLocalEvents):
                    self._propose_local_events(message.events)
                else:
                    self._propose_commands(message)
            elif self.master != self.node_id:
                self._send(self.master, message)

    # ------------------------------------------------------------- membership

    def _add_learner(self, node: NodeId) -> None:
        if node == self.node_id:
            return
        if node not in self._progress:
            self._progress[node] = _Progress(self._log.last_index + 1, -1, self._now)
            self._send_append(node)
        self._note_heard(node)

    def _note_heard(self, node: NodeId) -> None:
        progress = self._progress.get(node)
        if progress is not None:
            progress.last_heard = self._now

    def _config_change_allowed(self) -> bool:
        """One voter change at a time, and only once this term has committed an entry."""
        if self._log.term_at(self.commit) != self.term:
            return False
        return not any(
            is_config_change(e) for e in self._log.slice(self.commit + 1, self._log.last_index + 1)
        )

    def _propose_config(self, event: MemberJoined | MemberLeft | MemberTimedOut) -> bool:
        if not self._config_change_allowed():
            return False
        if isinstance(event, MemberJoined) == (event.node_id in self.members.voters):
            return False
        self._append_own([event])
        return True

    def _maintain_members(self) -> None:
        timeout = self._cfg.member_timeout_ticks
        for node, progress in sorted(self._progress.items()):
            silent = self._now - progress.last_heard
            if node in self.members.voters:
                if silent >= timeout:
                    silent_ms = silent * self._cfg.tick_ms
                    self._propose_config(MemberTimedOut(node_id=node, silent_ms=silent_ms))
                    return
            elif silent >= timeout:
                del self._progress[node]  # a learner that went away
            elif node in self._departed:
                if progress.match_index >= self.commit:
                    self._send_append(node)  # it learns its removal is committed
                    del self._progress[node]
            elif (
                progress.match_index >= self.commit
                and silent < self._cfg.election_ticks
                and self._propose_config(MemberJoined(node_id=node))
            ):
                return

    def _request_leave(self) -> None:
        if self.node_id not in self._committed_members.voters:
            self._leaving, self._left = False, True
            return
        if self.role == "leader":
            self._departed.add(self.node_id)
            self._propose_config(MemberLeft(node_id=self.node_id))
        elif self.master is not None:
            self._send(self.master, LeaveRequest())

    # ------------------------------------------------------------------ send

    def _send(self, to: NodeId, message: ConsensusMessage) -> None:
        self._out_messages.append(
            Packet(cluster=self.cluster, sender=self.node_id, to=to, message=message)
        )


def _term_of(message: ConsensusMessage) -> int:
    match message:
        case (
            VoteRequest()
            | VoteResponse()
            | AppendEntries()
            | AppendResponse()
            | InstallSnapshot()
            | SnapshotAck()
        ):
            return message.term
        case _:
            return 0
