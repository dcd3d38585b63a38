"""Focused tests of the consensus core: election, replication, commands, membership."""

import random

from pydantic import TypeAdapter

from exo.master.decide import Decision
from exo.routing.consensus import (
    CommandDecided,
    ConsensusConfig,
    ConsensusNode,
    HardState,
    LogEntry,
    MasterElected,
    MemberJoined,
    MemberLeft,
    MemberTimedOut,
    Packet,
    Restored,
)
from exo.routing.consensus.log import entry_bytes
from exo.routing.consensus.messages import (
    AppendEntries,
    AppendResponse,
    ForwardCommands,
    InstallSnapshot,
    Snapshot,
    SnapshotAck,
    VoteRequest,
    VoteResponse,
    decode_snapshot,
    encode_snapshot,
)
from exo.shared.types.commands import CancelTask, CommandEnvelope
from exo.shared.types.events import LocalEvent, ModelStoreProgress
from exo.shared.types.ids import CommandId, ModelId, NodeId, TaskId
from exo.shared.types.state import State
from tests.test_cluster_simulation import Sim, sim_decide

_PACKET = TypeAdapter(Packet)
A, B, C = NodeId("a"), NodeId("b"), NodeId("c")


def _node(node_id: NodeId, restored: Restored | None = None, **config: int) -> ConsensusNode:
    return ConsensusNode(
        node_id,
        origin=f"{node_id}/s1",
        rng=random.Random(0),
        decide=sim_decide,
        config=ConsensusConfig(**config),
        peers=[A, B, C],
        restored=restored,
    )


def _progress(origin: str, seq: int) -> LocalEvent:
    event = ModelStoreProgress(
        node_id=A, model_id=ModelId("m"), done_bytes=seq, total_bytes=100, complete=False
    )
    return LocalEvent(origin=origin, origin_seq=seq, event=event)


def _entry(index: int, term: int, event: MemberJoined | MasterElected | None = None) -> LogEntry:
    return LogEntry(
        index=index,
        term=term,
        origin="x/master",
        origin_seq=index,
        event=event or MasterElected(node_id=A, term=max(term, 1)),
    )


def _voters_log(term: int, last: int) -> list[LogEntry]:
    """A log whose voters are a, b, c: three joins, then MasterElected entries."""
    joins = [_entry(i, 1, MemberJoined(node_id=n)) for i, n in enumerate((A, B, C))]
    return joins + [_entry(i, term) for i in range(3, last + 1)]


def _restored(term: int, last: int, commit: int = 2) -> Restored:
    hard = HardState(term=term, voted_for=None, commit=commit, cluster="c1")
    return Restored(hard_state=hard, snapshot=None, entries=_voters_log(term, last))


def _packet(sender: NodeId, to: NodeId, message: object) -> Packet:
    return Packet.model_validate({"cluster": "c1", "sender": sender, "to": to, "message": message})


def _cancel(n: int, node: NodeId) -> CommandEnvelope:
    return CommandEnvelope(
        command_id=CommandId(f"cmd-{n}"),
        origin=node,
        command=CancelTask(task_id=TaskId(f"task-{n}"), reason="test"),
    )


# ---------------------------------------------------------------- one node


def test_bootstrap_indexes_local_events_exactly_once_and_in_order() -> None:
    node = _node(A)
    node.bootstrap("c1")
    assert node.is_master and node.term == 1
    first = node.ready()
    assert [type(e.event) for e in first.committed] == [MemberJoined, MasterElected]
    assert first.hard_state is not None and first.hard_state.cluster == "c1"
    # seq 1 before seq 0 is held back; a re-send of seq 0 is dropped.
    node.submit_local_events([_progress("p/1", 1)])
    node.ready()
    node.submit_local_events([_progress("p/1", 0), _progress("p/1", 0)])
    node.tick()
    committed = [e for _ in range(12) for e in (node.tick(), node.ready())[1].committed]
    seqs = [e.origin_seq for e in committed if e.origin == "p/1"]
    assert seqs == [0, 1]
    assert node.state.origin_seqs["p/1"] == 1
    # The persisted entries and the committed ones are the same, gap-free.
    assert node.state.last_index == node.commit == node.last_index


def test_a_command_on_a_lone_master_is_decided_once() -> None:
    node = _node(A)
    node.bootstrap("c1")
    node.submit_command(_cancel(1, A))
    node.submit_command(_cancel(3, A))  # sim_decide rejects multiples of three
    ready = node.ready()
    assert [r.kind for r in ready.replies] == ["accepted", "rejected"]
    decided = [e for e in ready.committed if isinstance(e.event, CommandDecided)]
    assert [e.origin_seq for e in decided] == [0, 1]
    accepted = ready.replies[0]
    assert accepted.kind == "accepted" and accepted.last_index == decided[0].index


# ------------------------------------------------------------------- election


def test_votes_go_only_to_a_log_at_least_as_complete() -> None:
    voter = _node(B, _restored(term=2, last=5))
    behind = VoteRequest(term=3, last_log_index=9, last_log_term=1, seniority=0, pre_vote=False)
    voter.receive(_packet(A, B, behind))  # longer, but its last entry is older: refused
    reply = voter.ready().messages[0].message
    assert isinstance(reply, VoteResponse) and not reply.granted and reply.term == 3
    ahead = VoteRequest(term=3, last_log_index=5, last_log_term=2, seniority=0, pre_vote=False)
    voter.receive(_packet(C, B, ahead))
    ready = voter.ready()
    reply = ready.messages[0].message
    assert isinstance(reply, VoteResponse) and reply.granted
    assert ready.hard_state is not None and ready.hard_state.voted_for == C  # persisted first
    # One vote per term: a second candidate in term 3 is refused.
    voter.receive(_packet(A, B, ahead))
    reply = voter.ready().messages[0].message
    assert isinstance(reply, VoteResponse) and not reply.granted


def test_a_node_that_is_no_voter_by_its_own_log_votes_for_nobody() -> None:
    """A node whose log was moved aside restarts with its old id and an empty log: it may
    have voted in the candidate's term already, so it must not vote again."""
    fresh = _node(B)
    ask = VoteRequest(term=3, last_log_index=5, last_log_term=2, seniority=0, pre_vote=False)
    fresh.receive(_packet(C, B, ask))
    ready = fresh.ready()
    reply = ready.messages[0].message
    assert isinstance(reply, VoteResponse) and not reply.granted
    assert fresh.voted_for is None


def test_a_pre_vote_raises_no_term_and_a_live_master_keeps_its_followers() -> None:
    follower = _node(B, _restored(term=2, last=5))
    ask = VoteRequest(term=3, last_log_index=5, last_log_term=2, seniority=0, pre_vote=True)
    follower.receive(_packet(C, B, ask))
    reply = follower.ready().messages[0].message
    assert isinstance(reply, VoteResponse) and reply.granted and follower.term == 2
    heartbeat = AppendEntries(term=2, prev_index=5, prev_term=2, entries=(), commit=2)
    follower.receive(_packet(A, B, heartbeat))
    follower.ready()
    follower.receive(_packet(C, B, ask))  # within the lease of master a: refused
    reply = follower.ready().messages[0].message
    assert isinstance(reply, VoteResponse) and not reply.granted


def test_events_from_a_stale_term_are_rejected() -> None:
    follower = _node(B, _restored(term=5, last=4))
    stale = AppendEntries(term=4, prev_index=4, prev_term=5, entries=(_entry(5, 4),), commit=5)
    follower.receive(_packet(A, B, stale))
    ready = follower.ready()
    reply = ready.messages[0].message
    assert isinstance(reply, AppendResponse) and not reply.success and reply.term == 5
    assert not ready.entries and follower.last_index == 4


def test_a_gap_is_answered_with_a_range_request() -> None:
    follower = _node(B, _restored(term=2, last=4))
    ahead = AppendEntries(term=2, prev_index=9, prev_term=2, entries=(_entry(10, 2),), commit=2)
    follower.receive(_packet(A, B, ahead))
    reply = follower.ready().messages[0].message
    assert isinstance(reply, AppendResponse) and not reply.success and reply.hint_index == 5
    fill = AppendEntries(
        term=2, prev_index=4, prev_term=2, entries=tuple(_entry(i, 2) for i in (5, 6)), commit=6
    )
    follower.receive(_packet(A, B, fill))
    ready = follower.ready()
    assert [e.index for e in ready.entries] == [5, 6]
    assert [e.index for e in ready.committed] == [3, 4, 5, 6]
    reply = ready.messages[0].message
    assert isinstance(reply, AppendResponse) and reply.success and reply.match_index == 6


def test_a_deposed_masters_uncommitted_tail_is_replaced() -> None:
    follower = _node(B, _restored(term=2, last=6, commit=4))
    newer = AppendEntries(term=3, prev_index=4, prev_term=2, entries=(_entry(5, 3),), commit=4)
    follower.receive(_packet(C, B, newer))
    ready = follower.ready()
    assert ready.truncate_after == 4 and [e.index for e in ready.entries] == [5]
    assert follower.last_index == 5 and follower.term == 3


def test_old_term_entries_commit_only_with_an_entry_of_the_masters_term() -> None:
    # a holds entries 3..5 of term 2 uncommitted; it wins term 3 and appends MasterElected.
    master = _node(A, _restored(term=2, last=5))
    for _ in range(40):
        master.tick()
        if master.role == "pre_candidate":
            break
    master.ready()
    master.receive(_packet(B, A, VoteResponse(term=3, granted=True, pre_vote=True)))
    master.ready()
    master.receive(_packet(B, A, VoteResponse(term=3, granted=True, pre_vote=False)))
    assert master.is_master and master.term == 3 and master.last_index == 6
    master.ready()
    # b stored up to 5 (the old term's entries) only: nothing may commit by counting them.
    master.receive(_packet(B, A, AppendResponse(term=3, success=True, match_index=5, hint_index=6)))
    assert master.commit == 2
    master.receive(_packet(B, A, AppendResponse(term=3, success=True, match_index=6, hint_index=7)))
    assert master.commit == 6


# ------------------------------------------------------------ the whole cluster


def test_nodes_join_and_all_hold_the_same_state() -> None:
    sim = Sim(seed=11, n=3, loss=0.0, duplicate=0.0)
    for _ in range(60):
        sim.step()
    master = sim.nodes[sim.ids[0]]
    assert master.is_master and set(master.members.voters) == set(sim.ids)
    for node in sim.ids:
        sim.produce(node)
    sim.settle(200)
    sim.check_final()


def test_failover_elects_a_master_that_keeps_the_log_within_two_seconds() -> None:
    sim = Sim(seed=5, n=5, loss=0.0, duplicate=0.0, max_delay=1)
    sim.settle(300)
    for node in sim.ids:
        sim.produce(node)
    sim.settle(100)
    old = sim.master()
    assert old is not None
    old_commit, old_term = sim.nodes[old].commit, sim.nodes[old].term
    sim.crash(old)
    ticks = 0
    while True:
        sim.step()
        ticks += 1
        new = sim.master()
        if new is not None and sim.nodes[new].commit > old_commit:
            break
        assert ticks < 200
    assert sim.nodes[new].term > old_term
    elapsed_ms = ticks * sim.config.tick_ms
    assert elapsed_ms < 2000, f"failover took {elapsed_ms} ms"
    sim.start(old)
    sim.settle(400)
    sim.check_final()


def test_commands_wait_for_an_election_and_are_answered_once() -> None:
    sim = Sim(seed=3, n=3, loss=0.0, duplicate=0.0)
    sim.settle(300)
    master = sim.master()
    assert master is not None
    sim.crash(master)
    follower = next(n for n in sim.ids if n != master)
    sim.command(follower)  # no master now: it waits, then goes to the new one
    sim.settle(300)
    (reply,) = sim.replies.values()
    assert reply.kind == "accepted"
    sim.start(master)
    sim.settle(300)
    sim.check_final()


def test_a_command_without_any_master_is_rejected_within_its_bound() -> None:
    sim = Sim(seed=4, n=3, loss=0.0, duplicate=0.0)
    sim.settle(300)
    survivor = sim.ids[1]
    for node in sim.ids:
        if node != survivor:
            sim.crash(node)
    sim.command(survivor)
    for _ in range(sim.config.command_timeout_ticks + 1):
        sim.step()
    (reply,) = sim.replies.values()
    assert reply.kind == "rejected" and reply.code == "not_master"


def _late_joiner(config: ConsensusConfig) -> tuple[Sim, NodeId]:
    """Three nodes; the third is down while 400 entries commit (several snapshots, the
    log compacted), then starts again."""
    sim = Sim(seed=8, n=3, loss=0.0, duplicate=0.0, config=config)
    late = sim.ids[2]
    sim.crash(late)
    for i in range(400):
        sim.produce(sim.ids[i % 2])
        sim.step()
    sim.settle(100)
    sim.start(late)
    return sim, late


def test_a_late_joiner_catches_up_from_a_snapshot_and_the_tail() -> None:
    sim, late = _late_joiner(ConsensusConfig(snapshot_every=50))
    resets = 0
    for _ in range(200):
        sim.step()
        resets += sim.disks[late].snapshot is not None
        if sim.converged():
            break
    sim.check_final()
    snapshot = sim.disks[late].snapshot
    assert snapshot is not None and snapshot.index >= 300  # it never received early entries
    assert sim.nodes[late].entries(0, 50) == []


def test_appends_and_forwarded_commands_stay_within_the_message_budget() -> None:
    # A budget of a few entries: a lagging follower gets its catch-up in many appends, and a
    # burst of commands goes to the master in many forwards, none over the budget (unless
    # it carries a single item), and everything still commits once.
    budget = 2_000
    config = ConsensusConfig(snapshot_every=10_000, max_message_bytes=budget)
    sim = Sim(seed=21, n=3, loss=0.0, duplicate=0.0, config=config)
    sim.settle(100)
    master = sim.master()
    assert master is not None
    lagging = next(n for n in sim.ids if n != master)
    sender = next(n for n in sim.ids if n not in (master, lagging))
    sent: dict[str, list[tuple[int, int]]] = {"append": [], "forward": []}
    seen = sim.sent

    def step() -> None:
        nonlocal seen
        sim.step()
        for _at, n, packet in sim.in_flight:
            if n <= seen:
                continue
            match packet.message:
                case AppendEntries(entries=entries) if entries:
                    total = sum(entry_bytes(e) for e in entries)
                    sent["append"].append((len(entries), total))
                case ForwardCommands(commands=commands):
                    total = sum(len(c.envelope.model_dump_json()) for c in commands)
                    sent["forward"].append((len(commands), total))
                case _:
                    pass
        seen = sim.sent

    sim.crash(lagging)
    for i in range(120):
        sim.produce(master if i % 2 else sender)
        sim.command(sender)
        if i % 30 != 29:  # bursts: commands pile up between steps
            continue
        step()
    sim.start(lagging)
    for _ in range(400):
        step()
        if sim.converged() and len(sim.replies) == len(sim.submitted_commands):
            break
    sim.check_final()
    assert len(sim.replies) == len(sim.submitted_commands) == 120
    for kind, messages in sent.items():
        assert all(count == 1 or total <= budget for count, total in messages), (kind, messages)
        # Split, not one message each: entries and commands are a few hundred bytes.
        assert max(count for count, _ in messages) > 1, (kind, messages)
        assert len(messages) >= 5, (kind, messages)


def test_a_snapshot_larger_than_a_message_travels_in_acknowledged_chunks() -> None:
    # A late joiner's catch-up snapshot is several times the message budget (the real
    # case: a state of many 4 MiB requests against the mesh's 64 MiB frame). It arrives in
    # chunks none over the budget, through lost and duplicated packets, and the joiner
    # ends with the others' state without ever holding the early entries.
    budget = 64
    sim, late = _late_joiner(ConsensusConfig(snapshot_every=50, max_message_bytes=budget))
    sim.loss, sim.duplicate = 0.05, 0.05
    chunks: list[tuple[int, int, int, int]] = []
    acks = 0
    seen = sim.sent
    for _ in range(600):
        sim.step()
        for _at, n, packet in sim.in_flight:
            if n <= seen:
                continue
            if isinstance(packet.message, InstallSnapshot | SnapshotAck):
                assert _PACKET.validate_json(_PACKET.dump_json(packet)) == packet  # the wire
            match packet.message:
                case InstallSnapshot(index=index, offset=offset, total=total, data=data):
                    chunks.append((index, offset, len(data), total))
                case SnapshotAck():
                    acks += 1
                case _:
                    pass
        seen = sim.sent
        if sim.converged():
            break
    sim.settle(200)
    sim.check_final()
    snapshot = sim.disks[late].snapshot
    assert snapshot is not None and snapshot.index >= 300
    assert sim.nodes[late].entries(0, 50) == []
    assert all(size <= budget for _i, _o, size, _t in chunks), chunks
    total = max(t for _i, _o, _s, t in chunks)
    assert total > 4 * budget, total  # so it took several chunks, each acknowledged
    assert len({o for _i, o, _s, _t in chunks}) >= total // budget
    assert acks >= total // budget


def _a_snapshot() -> Snapshot:
    sim = Sim(seed=8, n=3, loss=0.0, duplicate=0.0, config=ConsensusConfig(snapshot_every=50))
    for i in range(120):
        sim.produce(sim.ids[i % 2])
        sim.step()
    snapshot = sim.disks[sim.ids[0]].snapshot
    assert snapshot is not None
    return snapshot


def test_a_follower_takes_snapshot_chunks_only_in_order_and_checks_the_whole() -> None:
    snapshot = _a_snapshot()
    wire = encode_snapshot(snapshot)
    assert decode_snapshot(wire) == snapshot
    size = len(wire) // 3 + 1
    parts = [wire[i : i + size] for i in range(0, len(wire), size)]
    assert len(parts) == 3

    def chunk(i: int, data: str | None = None, to: NodeId = B) -> Packet:
        message = InstallSnapshot(
            term=snapshot.term,
            index=snapshot.index,
            snapshot_term=snapshot.term,
            offset=i * size,
            total=len(wire),
            data=parts[i] if data is None else data,
        )
        return _packet(A, to, message)

    def answer(follower: ConsensusNode, packet: Packet) -> AppendResponse | SnapshotAck:
        follower.receive(packet)
        (reply,) = [p.message for p in follower.ready().messages if p.to == A]
        assert isinstance(reply, AppendResponse | SnapshotAck)
        return reply

    follower = _node(B)
    # A chunk of a snapshot it never began: from the start.
    assert answer(follower, chunk(1)) == SnapshotAck(
        term=snapshot.term, index=snapshot.index, received=0
    )
    assert answer(follower, chunk(0)) == SnapshotAck(
        term=snapshot.term, index=snapshot.index, received=size
    )
    # A duplicate, and a chunk ahead of what it holds: it says what it holds.
    for stray in (chunk(0), chunk(2)):
        reply = answer(follower, stray)
        assert isinstance(reply, SnapshotAck) and reply.received == size
    assert answer(follower, chunk(1)) == SnapshotAck(
        term=snapshot.term, index=snapshot.index, received=2 * size
    )
    assert follower.state == State()  # nothing installed before the last chunk
    done = answer(follower, chunk(2))
    assert isinstance(done, AppendResponse) and done.success
    assert done.match_index == snapshot.index
    assert follower.commit == snapshot.index and follower.state == snapshot.state

    # Chunks that do not decode to the snapshot they claim: nothing installed, start again.
    other = _node(C)
    answer(other, chunk(0, to=C))
    answer(other, chunk(1, to=C))
    broken = "A" * len(parts[2])
    assert answer(other, chunk(2, broken, to=C)) == SnapshotAck(
        term=snapshot.term, index=snapshot.index, received=0
    )
    assert other.commit == -1 and other.state == State()


def test_decode_snapshot_refuses_what_is_not_one() -> None:
    for text in ("", "not base64!", "AAAA", encode_snapshot(_a_snapshot())[:-8]):
        try:
            decode_snapshot(text)
        except ValueError:
            continue
        raise AssertionError(f"decoded {text[:20]!r}")


def test_a_restarted_node_replays_its_disk_to_the_same_state() -> None:
    sim = Sim(seed=9, n=3, loss=0.0, duplicate=0.0, config=ConsensusConfig(snapshot_every=40))
    for i in range(150):
        sim.produce(sim.ids[i % 3])
        sim.step()
    sim.settle(100)
    follower = next(n for n in sim.ids if not sim.nodes[n].is_master)
    before = sim.nodes[follower].state
    sim.crash(follower)
    restored = sim.disks[follower].restored()
    assert restored is not None
    again = ConsensusNode(
        follower, origin="x/s2", rng=random.Random(1), decide=sim_decide, restored=restored
    )
    assert again.state == before and again.commit == before.last_index


def test_silent_members_time_out_and_leavers_leave() -> None:
    sim = Sim(seed=12, n=5, loss=0.0, duplicate=0.0)
    sim.settle(300)
    gone = next(n for n in sim.ids if not sim.nodes[n].is_master)
    sim.crash(gone)
    for _ in range(sim.config.member_timeout_ticks + 40):
        sim.step()
    master = sim.master()
    assert master is not None and gone not in sim.nodes[master].members.voters
    leaver = next(n for n in sim.ids if n not in (gone, master))
    sim.nodes[leaver].leave()
    for _ in range(100):
        sim.step()
    assert leaver not in sim.nodes[master].members.voters
    log = [sim.committed[i] for i in range(sim.nodes[master].commit + 1)]
    assert any(isinstance(e.event, MemberTimedOut) and e.event.node_id == gone for e in log)
    assert any(isinstance(e.event, MemberLeft) and e.event.node_id == leaver for e in log)


def test_packets_from_another_cluster_are_dropped() -> None:
    node = _node(A)
    node.bootstrap("c1")
    node.ready()
    foreign = Packet(
        cluster="c2",
        sender=B,
        to=A,
        message=AppendEntries(term=9, prev_index=-1, prev_term=0, entries=(), commit=-1),
    )
    node.receive(foreign)
    assert node.is_master and node.term == 1 and node.foreign_packets == 1


def test_every_message_survives_the_wire() -> None:
    sim = Sim(seed=2, n=3, config=ConsensusConfig(snapshot_every=30))
    kinds: set[str] = set()

    def step() -> None:
        sim.step()
        for _at, _n, packet in sim.in_flight:
            kinds.add(packet.message.kind)
            assert _PACKET.validate_json(_PACKET.dump_json(packet)) == packet

    sim.crash(sim.ids[2])
    for i in range(100):
        sim.produce(sim.ids[i % 2])
        if i % 10 == 0:
            sim.command(sim.ids[1])
        step()
    sim.start(sim.ids[2])
    for _ in range(100):
        step()
    sim.crash(sim.ids[0])
    for _ in range(100):
        step()
    assert kinds >= {
        "vote_response",
        "vote_request",
        "append_entries",
        "append_response",
        "install_snapshot",
        "forward_local_events",
        "forward_commands",
        "command_replies",
        "join_request",
    }


def test_the_simulation_is_deterministic() -> None:
    def run() -> tuple[int, str]:
        sim = Sim(seed=21, n=4)
        sim.run_chaos(400)
        node = sim.nodes[sorted(sim.nodes)[0]]
        return node.commit, node.state.state_hash()

    assert run() == run()


def test_decide_sees_the_entries_the_master_holds() -> None:
    seen: list[State] = []

    def decide(state: State, envelope: CommandEnvelope) -> Decision:
        seen.append(state)
        return Decision()

    node = ConsensusNode(A, origin="a/s1", rng=random.Random(0), decide=decide, peers=[A, B])
    node.bootstrap("c1")
    node.submit_command(_cancel(1, A))
    node.ready()
    assert seen[0].last_index == 1  # MemberJoined and MasterElected, committed or not
