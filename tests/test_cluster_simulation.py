"""Deterministic in-process simulation of a cluster of consensus nodes (no sockets, no sleeps).

Each step every live node ticks; packets travel with a random delay (reordering), may be
lost or duplicated, and partitions cut links for a while; masters and followers crash and
restart from what they persisted. At the end the network heals and every live node must
hold the same committed log and state hash; nothing committed is lost or duplicated and
no term ever had two masters.
"""

import random
from collections import Counter
from dataclasses import dataclass, field

import pytest

from exo.master.decide import Decision, Rejection
from exo.routing.consensus import (
    CommandDecided,
    ConsensusConfig,
    ConsensusNode,
    HardState,
    LogEntry,
    Packet,
    Ready,
    Restored,
    Snapshot,
)
from exo.shared.types.commands import (
    CancelTask,
    CommandAccepted,
    CommandEnvelope,
    CommandReply,
)
from exo.shared.types.events import LocalEvent, ModelStoreProgress, TaskCancelled
from exo.shared.types.ids import CommandId, ModelId, NodeId, TaskId
from exo.shared.types.state import State


def sim_decide(state: State, envelope: CommandEnvelope) -> Decision | Rejection:
    """A stand-in for the master's `decide`: every third command is rejected."""
    command = envelope.command
    assert isinstance(command, CancelTask)
    if int(command.task_id.rsplit("-", 1)[1]) % 3 == 0:
        return Rejection(code="not_found", message=f"no task {command.task_id}")
    return Decision(
        events=(TaskCancelled(task_id=command.task_id, reason="sim"),), created_id=command.task_id
    )


@dataclass
class Disk:
    """What one node persisted, written exactly as `Ready`'s docstring says."""

    hard_state: HardState | None = None
    snapshot: Snapshot | None = None
    entries: list[LogEntry] = field(default_factory=list[LogEntry])

    def persist(self, ready: Ready) -> None:
        if ready.snapshot is not None and ready.snapshot_resets_log:
            self.snapshot, self.entries = ready.snapshot, []
        if ready.truncate_after is not None:
            assert self.hard_state is None or ready.truncate_after >= min(
                self.hard_state.commit, self._last()
            ), "truncated a committed entry"
            self.entries = [e for e in self.entries if e.index <= ready.truncate_after]
        for entry in ready.entries:
            assert entry.index == self._last() + 1, "persisted log has a gap"
            self.entries.append(entry)
        if ready.snapshot is not None and not ready.snapshot_resets_log:
            self.snapshot = ready.snapshot
            if ready.compact_upto is not None:
                self.entries = [e for e in self.entries if e.index > ready.compact_upto]
        if ready.hard_state is not None:
            self.hard_state = ready.hard_state

    def _last(self) -> int:
        if self.entries:
            return self.entries[-1].index
        return self.snapshot.index if self.snapshot is not None else -1

    def restored(self) -> Restored | None:
        if self.hard_state is None:
            return None
        return Restored(
            hard_state=self.hard_state, snapshot=self.snapshot, entries=list(self.entries)
        )


@dataclass
class Producer:
    """A node's workers and API: local events and commands of one daemon session."""

    origin: str
    next_seq: int = 0
    pending_commands: dict[CommandId, int] = field(default_factory=dict[CommandId, int])


class Sim:
    def __init__(
        self,
        seed: int,
        n: int = 5,
        *,
        loss: float = 0.05,
        duplicate: float = 0.03,
        max_delay: int = 3,
        config: ConsensusConfig | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.ids = [NodeId(f"n{i}") for i in range(n)]
        self.config = config or ConsensusConfig(snapshot_every=200)
        self.loss, self.duplicate, self.max_delay = loss, duplicate, max_delay
        self.disks = {node: Disk() for node in self.ids}
        self.nodes: dict[NodeId, ConsensusNode] = {}
        self.producers: dict[NodeId, Producer] = {}
        self.sessions = Counter[NodeId]()
        self.now = 0
        self.in_flight: list[tuple[int, int, Packet]] = []
        self.sent = 0
        self.cut: set[frozenset[NodeId]] = set()
        # Invariants observed along the way.
        self.masters: dict[int, NodeId] = {}
        self.committed: dict[int, LogEntry] = {}
        self.replies: dict[CommandId, CommandReply] = {}
        # Commands awaiting a reply, by the node whose API holds them (a crash drops them).
        self.submitted_commands: dict[CommandId, NodeId] = {}
        self.command_seq = 0
        for node in self.ids:
            self.start(node)
        self.nodes[self.ids[0]].bootstrap("sim-cluster")
        self.drain(self.ids[0])

    # ------------------------------------------------------------ node lifecycle

    def start(self, node: NodeId) -> None:
        self.sessions[node] += 1
        origin = f"{node}/s{self.sessions[node]}"
        self.nodes[node] = ConsensusNode(
            node,
            origin=origin,
            rng=random.Random(self.rng.random()),
            decide=sim_decide,
            config=self.config,
            peers=self.ids,
            restored=self.disks[node].restored(),
        )
        self.producers[node] = Producer(origin)
        self.drain(node)

    def crash(self, node: NodeId) -> None:
        del self.nodes[node]  # what was not persisted (and its producers' queue) is gone
        for command_id, origin in list(self.submitted_commands.items()):
            if origin == node and command_id not in self.replies:
                del self.submitted_commands[command_id]

    def drain(self, node: NodeId) -> None:
        consensus = self.nodes[node]
        ready = consensus.ready()
        self.disks[node].persist(ready)
        for entry in ready.committed:
            known = self.committed.setdefault(entry.index, entry)
            assert known == entry, f"{node} committed a different entry at {entry.index}"
        for reply in ready.replies:
            assert reply.command_id not in self.replies, "a command answered twice"
            self.replies[reply.command_id] = reply
        for packet in ready.messages:
            self.sent += 1
            if self.rng.random() < self.loss:
                continue
            copies = 2 if self.rng.random() < self.duplicate else 1
            for _ in range(copies):
                at = self.now + self.rng.randint(0, self.max_delay)
                self.in_flight.append((at, self.sent, packet))
        if consensus.is_master:
            holder = self.masters.setdefault(consensus.term, node)
            assert holder == node, f"two masters in term {consensus.term}: {holder}, {node}"

    # ------------------------------------------------------------------ workload

    def produce(self, node: NodeId) -> None:
        producer = self.producers[node]
        event = ModelStoreProgress(
            node_id=node,
            model_id=ModelId("m"),
            done_bytes=producer.next_seq,
            total_bytes=10**9,
            complete=False,
        )
        local = LocalEvent(origin=producer.origin, origin_seq=producer.next_seq, event=event)
        producer.next_seq += 1
        self.nodes[node].submit_local_events([local])

    def command(self, node: NodeId) -> None:
        self.command_seq += 1
        command_id = CommandId(f"cmd-{self.command_seq}")
        envelope = CommandEnvelope(
            command_id=command_id,
            origin=node,
            command=CancelTask(task_id=TaskId(f"task-{self.command_seq}"), reason="sim"),
        )
        self.submitted_commands[command_id] = node
        self.nodes[node].submit_command(envelope)

    # ---------------------------------------------------------------------- step

    def step(self) -> None:
        self.now += 1
        due = [f for f in self.in_flight if f[0] <= self.now]
        self.in_flight = [f for f in self.in_flight if f[0] > self.now]
        self.rng.shuffle(due)
        for _at, _n, packet in due:
            if packet.to not in self.nodes or frozenset((packet.sender, packet.to)) in self.cut:
                continue
            self.nodes[packet.to].receive(packet)
            self.drain(packet.to)
        for node in sorted(self.nodes):
            self.nodes[node].tick()
            self.drain(node)

    def partition(self, side: set[NodeId]) -> None:
        self.cut = {frozenset((a, b)) for a in side for b in self.ids if b not in side}

    def heal(self) -> None:
        self.cut = set()

    def master(self) -> NodeId | None:
        masters = [n for n, c in self.nodes.items() if c.is_master]
        return max(masters, key=lambda n: self.nodes[n].term) if masters else None

    # ----------------------------------------------------------------- scenario

    def run_chaos(self, steps: int, *, event_rate: float = 0.3, command_rate: float = 0.02) -> None:
        down: dict[NodeId, int] = {}
        partition_until = -1
        for _ in range(steps):
            for node in sorted(self.nodes):
                if self.rng.random() < event_rate:
                    self.produce(node)
                if self.rng.random() < command_rate:
                    self.command(node)
            roll = self.rng.random()
            master = self.master()
            if roll < 0.004 and master is not None and len(down) < 2:
                self.crash(master)  # the master dies
                down[master] = self.now + self.rng.randint(20, 200)
            elif roll < 0.006 and len(down) < 2:
                victim = self.rng.choice(sorted(self.nodes))
                self.crash(victim)
                down[victim] = self.now + self.rng.randint(20, 200)
            elif roll < 0.009 and partition_until < self.now:
                size = self.rng.randint(1, len(self.ids) // 2)
                self.partition(set(self.rng.sample(self.ids, size)))
                partition_until = self.now + self.rng.randint(20, 300)
            if partition_until == self.now:
                self.heal()
            for node, until in list(down.items()):
                if until <= self.now:
                    del down[node]
                    self.start(node)
            self.step()
        for node in down:
            self.start(node)
        self.heal()

    def settle(self, steps: int) -> None:
        self.loss = self.duplicate = 0.0
        for _ in range(steps):
            self.step()
            if self.converged():
                return

    def converged(self) -> bool:
        commits = {c.commit for c in self.nodes.values()}
        pending = sum(len(c._outbox) for c in self.nodes.values())  # pyright: ignore[reportPrivateUsage]
        voters = all(set(c.members.voters) == set(self.ids) for c in self.nodes.values())
        return len(commits) == 1 and pending == 0 and voters

    # ------------------------------------------------------------------- checks

    def check_final(self) -> None:
        assert self.converged(), {n: (c.role, c.term, c.commit) for n, c in self.nodes.items()}
        hashes = {c.state.state_hash() for c in self.nodes.values()}
        assert len(hashes) == 1, "live nodes disagree on the state"
        commit = next(iter(self.nodes.values())).commit
        log = [self.committed[i] for i in range(commit + 1)]  # gap-free, every index seen
        for node, consensus in self.nodes.items():
            held = consensus.entries(0, commit + 1)
            assert held == log[len(log) - len(held) :], f"{node} holds a different log"
            assert consensus.state.last_index == commit
        # Exactly once: each local event once, each command's outcome once.
        local = Counter(
            (e.origin, e.origin_seq) for e in log if isinstance(e.event, ModelStoreProgress)
        )
        assert all(count == 1 for count in local.values()), "a local event indexed twice"
        decided = Counter(
            e.event.reply.command_id for e in log if isinstance(e.event, CommandDecided)
        )
        assert all(count == 1 for count in decided.values()), "a command decided twice"
        cancelled = Counter(e.event.task_id for e in log if isinstance(e.event, TaskCancelled))
        assert all(count == 1 for count in cancelled.values()), "a command applied twice"
        # Every reply a client saw is the one in the log; every command was answered.
        by_id = {
            e.event.reply.command_id: e.event.reply
            for e in log
            if isinstance(e.event, CommandDecided)
        }
        for command_id, reply in self.replies.items():
            timed_out = reply.kind == "rejected" and reply.code in ("unavailable", "not_master")
            if not timed_out:  # a timed-out command may still have been decided later
                assert by_id[command_id] == reply, f"{command_id}: reply differs from the log"
            if isinstance(reply, CommandAccepted):
                assert reply.last_index <= commit
        assert set(self.submitted_commands) <= set(self.replies), "a command never answered"
        # Producers of live sessions: every event they emitted is in the log, in order.
        for producer in self.producers.values():
            seqs = sorted(seq for origin, seq in local if origin == producer.origin)
            assert seqs == list(range(producer.next_seq)), f"{producer.origin} lost events"


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
def test_chaos_converges_without_loss_or_duplicates(seed: int) -> None:
    sim = Sim(seed)
    sim.run_chaos(2500)
    sim.settle(1500)
    sim.check_final()
    assert len(sim.masters) >= 2, "the scenario never failed over"
    assert sim.nodes[sim.ids[0]].commit > 500


@pytest.mark.parametrize(("seed", "n", "loss"), [(7, 3, 0.15), (8, 7, 0.1)])
def test_chaos_in_smaller_and_larger_clusters(seed: int, n: int, loss: float) -> None:
    sim = Sim(seed, n, loss=loss)
    sim.run_chaos(2000)
    sim.settle(2000)
    sim.check_final()
