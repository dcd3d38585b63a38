"""Properties of the pure fold: determinism, replay = live, snapshot + tail = full log."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from exo.shared.apply import ApplyError, apply, fold
from exo.shared.types.events import (
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    ModelFilesRemoved,
    ModelStoreProgress,
    NodeStarted,
    RunnerStatusChanged,
    TaskCreated,
    TaskFinished,
)
from exo.shared.types.ids import ModelId
from exo.shared.types.runners import RunnerFailed, RunnerReady
from exo.shared.types.state import State
from tests.factories import INSTANCES, NODES, TASKS, events, indexed, instance, runner_of, task

_EVENT = TypeAdapter(IndexedEvent)


@settings(max_examples=200)
@given(st.lists(events(), max_size=60))
def test_fold_is_deterministic(evs: list[Event]) -> None:
    log = indexed(evs)
    assert fold(State(), log).state_hash() == fold(State(), log).state_hash()


@settings(max_examples=200)
@given(st.lists(events(), max_size=60), st.integers(0, 60))
def test_replay_from_disk_equals_live_state(evs: list[Event], cut: int) -> None:
    log = indexed(evs)
    live = State()
    for e in log:
        live = apply(live, e)
    # What a restarted node does: events decoded from bytes, state from a snapshot + tail.
    replayed_log = [_EVENT.validate_json(_EVENT.dump_json(e)) for e in log]
    cut = min(cut, len(log))
    snapshot = State.model_validate_json(fold(State(), replayed_log[:cut]).model_dump_json())
    restored = fold(snapshot, replayed_log[cut:])
    assert restored == live
    assert restored.state_hash() == live.state_hash()
    assert restored.last_index == len(log) - 1


@settings(max_examples=100)
@given(st.lists(events(), max_size=60))
def test_state_invariants_hold(evs: list[Event]) -> None:
    state = fold(State(), indexed(evs))
    runner_ids = {s.runner_id for i in state.instances.values() for s in i.shards}
    assert set(state.runners) == runner_ids
    for t in state.tasks.values():
        assert t.instance_id in state.instances


def test_apply_refuses_gaps_and_stale_terms() -> None:
    started = NodeStarted(node_id=NODES[0], session="s", hostname="h", api_port=1, started_at_ms=0)
    state = fold(State(), indexed([started], term=2))
    with pytest.raises(ApplyError, match="does not follow"):
        apply(state, indexed([started], term=2, start=5)[0])
    with pytest.raises(ApplyError, match="older"):
        apply(state, indexed([started], term=1, start=1)[0])


def test_failed_runner_fails_its_instance_and_tasks() -> None:
    inst = instance(INSTANCES[0], NODES[0])
    state = fold(
        State(),
        indexed(
            [
                InstanceCreated(instance=inst),
                RunnerStatusChanged(runner_id=runner_of(INSTANCES[0]), status=RunnerReady()),
                TaskCreated(task=task(TASKS[0], INSTANCES[0], NODES[1])),
                RunnerStatusChanged(
                    runner_id=runner_of(INSTANCES[0]), status=RunnerFailed(reason="oom")
                ),
            ]
        ),
    )
    assert state.instances[INSTANCES[0]].failed_reason == "oom"
    assert state.tasks == {}
    assert state.counters.failed == 1


def test_deleting_an_instance_removes_its_runners_and_tasks() -> None:
    state = fold(
        State(),
        indexed(
            [
                InstanceCreated(instance=instance(INSTANCES[0], NODES[0], stages=2)),
                TaskCreated(task=task(TASKS[0], INSTANCES[0], NODES[0])),
                InstanceDeleted(instance_id=INSTANCES[0], reason="bye"),
            ]
        ),
    )
    assert state.instances == {} and state.runners == {} and state.tasks == {}


def test_restarted_node_loses_the_tasks_it_owned() -> None:
    state = fold(
        State(),
        indexed(
            [
                InstanceCreated(instance=instance(INSTANCES[0], NODES[1])),
                TaskCreated(task=task(TASKS[0], INSTANCES[0], NODES[0])),
                TaskCreated(task=task(TASKS[1], INSTANCES[0], NODES[1])),
                NodeStarted(
                    node_id=NODES[0], session="s2", hostname="h", api_port=1, started_at_ms=0
                ),
            ]
        ),
    )
    assert set(state.tasks) == {TASKS[1]}
    assert state.nodes[NODES[0]].session == "s2"


def test_finished_tasks_leave_counters() -> None:
    state = fold(
        State(),
        indexed(
            [
                InstanceCreated(instance=instance(INSTANCES[0], NODES[0])),
                TaskCreated(task=task(TASKS[0], INSTANCES[0], NODES[0])),
                TaskFinished(
                    task_id=TASKS[0],
                    finish_reason="length",
                    prompt_tokens=5,
                    completion_tokens=7,
                    decode_tokens_per_s=10.0,
                ),
            ]
        ),
    )
    assert state.tasks == {}
    assert state.counters.finished == 1 and state.counters.completion_tokens == 7


def test_a_repeated_instance_id_changes_nothing() -> None:
    first = instance(INSTANCES[0], NODES[0], stages=2)
    state = fold(
        State(),
        indexed(
            [
                InstanceCreated(instance=first),
                InstanceCreated(instance=instance(INSTANCES[0], NODES[1], stages=1)),
            ]
        ),
    )
    assert state.instances[INSTANCES[0]] == first
    assert set(state.runners) == {runner_of(INSTANCES[0], 0), runner_of(INSTANCES[0], 1)}


def test_a_node_that_removed_a_model_s_files_is_no_longer_a_copy_of_it() -> None:
    model = ModelId("org/chat")
    done = [
        ModelStoreProgress(
            node_id=node, model_id=model, done_bytes=10, total_bytes=10, complete=True
        )
        for node in NODES[:2]
    ]
    state = fold(State(), indexed([*done, ModelFilesRemoved(node_id=NODES[1], model_id=model)]))
    assert list(state.model_progress) == [f"{NODES[0]}/{model}"]
    # Removing what the state never had changes nothing.
    late = indexed([ModelFilesRemoved(node_id=NODES[1], model_id=model)], start=3)[0]
    assert apply(state, late).model_progress == state.model_progress
