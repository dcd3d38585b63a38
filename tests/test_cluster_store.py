"""The cluster's durable store: what `persist(ready)` writes is what `restored()` reads."""

from pathlib import Path

import pytest

from exo.cluster.replace import lost_instances
from exo.cluster.store import ClusterStore
from exo.routing.consensus import HardState, Membership, Ready, Snapshot
from exo.shared.apply import fold
from exo.shared.eventlog import EventLogCompacted, EventLogFile
from exo.shared.types.events import (
    IndexedEvent,
    InstanceCreated,
    MasterElected,
    MemberJoined,
    MemberTimedOut,
    ModelStoreProgress,
    NodeStarted,
    TaskCreated,
)
from exo.shared.types.ids import InstanceId, ModelId, NodeId, TaskId
from exo.shared.types.state import State
from exo.shared.types.telemetry import LinkProfile
from exo.worker.telemetry.link_loop import changed
from tests.factories import indexed, instance, task

NODE = NodeId("node-a")


def entry(index: int, term: int = 1) -> IndexedEvent:
    if index == 0:
        event = MemberJoined(node_id=NODE)
    elif index == 1:
        event = MasterElected(node_id=NODE, term=term)
    else:
        event = ModelStoreProgress(
            node_id=NODE, model_id=ModelId("m"), done_bytes=index, total_bytes=100, complete=False
        )
    return IndexedEvent(index=index, term=term, origin="node-a/s", origin_seq=index, event=event)


def hard(term: int = 1, commit: int = -1) -> HardState:
    return HardState(term=term, voted_for=NODE, commit=commit, cluster="c1")


def test_a_fresh_store_has_nothing_to_restore(tmp_path: Path) -> None:
    store = ClusterStore(tmp_path / "cluster", fsync=False)
    assert store.restored() is None
    store.close()


def test_entries_truncation_and_hard_state_survive_a_reopen(tmp_path: Path) -> None:
    store = ClusterStore(tmp_path / "cluster", fsync=False)
    store.persist(Ready(entries=tuple(entry(i) for i in range(6)), hard_state=hard(commit=3)))
    # A deposed master's uncommitted tail goes; a new term's entries follow.
    store.persist(
        Ready(truncate_after=3, entries=(entry(4, term=2),), hard_state=hard(term=2, commit=4))
    )
    assert [e.index for e in store.read_range(0, 100)] == [0, 1, 2, 3, 4]
    store.close()

    reopened = ClusterStore(tmp_path / "cluster", fsync=False)
    restored = reopened.restored()
    assert restored is not None
    assert restored.hard_state == hard(term=2, commit=4)
    assert [(e.index, e.term) for e in restored.entries] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2)]
    reopened.close()


def test_a_snapshot_from_the_master_replaces_the_whole_log(tmp_path: Path) -> None:
    store = ClusterStore(tmp_path / "cluster", fsync=False)
    store.persist(Ready(entries=tuple(entry(i) for i in range(4)), hard_state=hard(commit=1)))
    state = fold(State(), [entry(i) for i in range(10)])
    snapshot = Snapshot(index=9, term=1, state=state, members=Membership(voters={NODE: 0}))
    store.persist(
        Ready(
            snapshot=snapshot,
            snapshot_resets_log=True,
            entries=(entry(10),),
            hard_state=hard(commit=9),
        )
    )
    store.close()
    reopened = ClusterStore(tmp_path / "cluster", fsync=False)
    restored = reopened.restored()
    assert restored is not None and restored.snapshot == snapshot
    assert [e.index for e in restored.entries] == [10]
    assert reopened.read_range(0, 100) == [entry(10)]  # the compacted part is gone
    reopened.close()


def test_an_own_checkpoint_compacts_behind_it(tmp_path: Path) -> None:
    store = ClusterStore(tmp_path / "cluster", fsync=False)
    store.persist(Ready(entries=tuple(entry(i) for i in range(8)), hard_state=hard(commit=7)))
    state = fold(State(), [entry(i) for i in range(6)])
    snapshot = Snapshot(index=5, term=1, state=state, members=Membership(voters={NODE: 0}))
    store.persist(Ready(snapshot=snapshot, compact_upto=3))
    assert [e.index for e in store.read_range(0, 100)] == [4, 5, 6, 7]
    restored = store.restored()
    assert restored is not None and restored.snapshot == snapshot
    assert [e.index for e in restored.entries] == [6, 7]
    store.close()


def test_truncating_into_the_compacted_part_is_refused(tmp_path: Path) -> None:
    with EventLogFile(tmp_path / "log", fsync=False) as log:
        log.append_many((i, b"x") for i in range(5))
        log.write_snapshot(2, b"state")
        log.compact(2)
        with pytest.raises(EventLogCompacted):
            log.truncate_after(0)
        log.truncate_after(3)
        assert log.last_index == 3
        log.reset(10)
        assert (log.first_index, log.last_index, len(log)) == (10, 9, 0)
        log.append(10, b"y")
        assert log.read_range(10, 11) == [(10, b"y")]


def test_a_single_node_log_from_before_the_cluster_is_adopted(tmp_path: Path) -> None:
    old = tmp_path / "events.log"
    with EventLogFile(old, fsync=False) as log:
        log.append_many((e.index, e.model_dump_json().encode()) for e in map(entry, range(5)))
    store = ClusterStore(tmp_path / "cluster", fsync=False)
    assert store.migrate_single_node_log(old, NODE, "c1")
    assert not store.migrate_single_node_log(old, NODE, "c1")  # once
    restored = store.restored()
    assert restored is not None and restored.snapshot is not None
    assert restored.snapshot.state == fold(State(), map(entry, range(5)))
    assert restored.snapshot.members.voters == {NODE: 0}
    assert restored.hard_state.cluster == "c1" and restored.hard_state.commit == 4
    store.close()


def link(rtt_ms: float, mb_s: float) -> LinkProfile:
    return LinkProfile(
        rtt_ms=rtt_ms,
        rtt_min_ms=rtt_ms,
        bandwidth_bytes_per_s=mb_s * 1e6,
        ping_samples=10,
        bulk_bytes=1,
        measured_at_ms=0,
    )


def test_link_events_only_on_a_real_change() -> None:
    assert changed(None, link(1.0, 100), 0.2)
    assert not changed(link(1.0, 100), link(1.1, 110), 0.2)
    assert changed(link(1.0, 100), link(1.5, 100), 0.2)
    assert changed(link(1.0, 100), link(1.0, 50), 0.2)
    # Sub-0.05 ms jitter on loopback is no change.
    assert not changed(link(0.01, 100), link(0.03, 100), 0.2)


def test_a_lost_member_fails_its_instances_and_tasks_and_only_those() -> None:
    a, b = NodeId("node-a"), NodeId("node-b")
    on_a, on_b = instance(InstanceId("inst-a"), a), instance(InstanceId("inst-b"), b)
    state = fold(
        State(),
        indexed(
            [
                *(
                    NodeStarted(node_id=n, session="s", hostname="h", api_port=1, started_at_ms=0)
                    for n in (a, b)
                ),
                MemberJoined(node_id=a),
                MemberJoined(node_id=b),
                MasterElected(node_id=a, term=1),
                InstanceCreated(instance=on_a),
                InstanceCreated(instance=on_b),
                TaskCreated(task=task(TaskId("t-a"), on_a.instance_id, a)),
                TaskCreated(task=task(TaskId("t-b"), on_b.instance_id, a)),
                TaskCreated(task=task(TaskId("t-owned"), on_a.instance_id, b)),
                MemberTimedOut(node_id=b, silent_ms=5000),
            ]
        ),
    )
    assert state.master == a
    assert (state.nodes[a].status, state.nodes[b].status) == ("up", "down")
    assert state.instances[on_a.instance_id].failed_reason is None
    assert "node-b timed out" in (state.instances[on_b.instance_id].failed_reason or "")
    # The task served by b and the one whose client was on b are gone; a's own survives.
    assert set(state.tasks) == {TaskId("t-a")}
    assert [i.instance_id for i in lost_instances(state)] == [on_b.instance_id]
