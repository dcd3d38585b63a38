"""The worker's pure plan(): state + local view -> actions."""

from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.apply import fold
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    ModelAdded,
    ModelFilesRemoved,
    ModelRemoved,
    ModelStoreProgress,
    RunnerStatusChanged,
    TaskCreated,
)
from exo.shared.types.ids import ModelId, NodeId
from exo.shared.types.runners import RunnerFailed, RunnerLoading, RunnerReady
from exo.shared.types.state import State
from exo.worker.plan import (
    AbortTask,
    DispatchTask,
    PruneModel,
    SpawnRunner,
    StopRunner,
    WorkerView,
    files_gone,
    plan,
)
from tests.factories import INSTANCES, NODES, TASKS, indexed, instance, runner_of, task

ME, OTHER = NODES
RUNNER = runner_of(INSTANCES[0])


def state_of(*events: Event) -> State:
    return fold(State(), indexed(list(events)))


def test_spawns_runners_for_its_own_shards_only() -> None:
    state = state_of(
        InstanceCreated(instance=instance(INSTANCES[0], ME)),
        InstanceCreated(instance=instance(INSTANCES[1], OTHER)),
    )
    actions = plan(state, WorkerView(node_id=ME))
    assert [type(a) for a in actions] == [SpawnRunner]
    assert isinstance(actions[0], SpawnRunner) and actions[0].shard.runner_id == RUNNER


def test_never_spawns_the_same_runner_twice() -> None:
    state = state_of(InstanceCreated(instance=instance(INSTANCES[0], ME)))
    assert plan(state, WorkerView(node_id=ME, spawned=frozenset({RUNNER}))) == []


def test_stops_runners_of_deleted_or_failed_instances() -> None:
    deleted = state_of(
        InstanceCreated(instance=instance(INSTANCES[0], ME)),
        InstanceDeleted(instance_id=INSTANCES[0], reason="user"),
    )
    view = WorkerView(node_id=ME, spawned=frozenset({RUNNER}), alive=frozenset({RUNNER}))
    assert plan(deleted, view) == [StopRunner(runner_id=RUNNER, reason="instance deleted")]
    two_stage = instance(INSTANCES[0], ME, stages=2)
    failed = state_of(
        InstanceCreated(instance=two_stage),
        RunnerStatusChanged(runner_id=runner_of(INSTANCES[0], 1), status=RunnerFailed(reason="x")),
    )
    assert plan(failed, view) == [StopRunner(runner_id=RUNNER, reason="instance failed")]


def test_dispatches_pending_tasks_once_the_runner_serves() -> None:
    base = [
        InstanceCreated(instance=instance(INSTANCES[0], ME)),
        TaskCreated(task=task(TASKS[0], INSTANCES[0], OTHER)),
    ]
    view = WorkerView(node_id=ME, spawned=frozenset({RUNNER}), alive=frozenset({RUNNER}))
    loading = state_of(
        *base, RunnerStatusChanged(runner_id=RUNNER, status=RunnerLoading(progress=0.5))
    )
    assert plan(loading, view) == []
    ready = state_of(*base, RunnerStatusChanged(runner_id=RUNNER, status=RunnerReady()))
    assert plan(ready, view) == [DispatchTask(task_id=TASKS[0], runner_id=RUNNER)]
    dispatched = view.model_copy(update={"dispatched": {TASKS[0]: RUNNER}})
    assert plan(ready, dispatched) == []


def test_aborts_dispatched_tasks_that_left_the_state() -> None:
    state = state_of(
        InstanceCreated(instance=instance(INSTANCES[0], ME)),
        RunnerStatusChanged(runner_id=RUNNER, status=RunnerReady()),
    )
    view = WorkerView(
        node_id=ME,
        spawned=frozenset({RUNNER}),
        alive=frozenset({RUNNER}),
        dispatched={TASKS[1]: RUNNER},
    )
    assert plan(state, view) == [AbortTask(task_id=TASKS[1], runner_id=RUNNER)]


def test_a_task_whose_first_stage_is_elsewhere_is_not_ours() -> None:
    state = state_of(
        InstanceCreated(instance=instance(INSTANCES[0], OTHER)),
        RunnerStatusChanged(runner_id=RUNNER, status=RunnerReady()),
        TaskCreated(task=task(TASKS[0], INSTANCES[0], ME)),
    )
    assert plan(state, WorkerView(node_id=ME)) == []


def test_prunes_the_files_of_models_the_cluster_removed() -> None:
    hub = SMOLLM2_135M_INSTRUCT.model_copy(
        update={"model_id": ModelId("org/chat"), "source": f"hf:org/chat@{'a' * 40}"}
    )
    stored = frozenset({hub.model_id, ModelId("org/other")})
    view = WorkerView(node_id=ME, stored=stored)
    added = state_of(ModelAdded(card=hub))
    assert plan(added, view) == []
    removed = state_of(ModelAdded(card=hub), ModelRemoved(model_id=hub.model_id))
    # Only what the cluster removed: files of a model it never knew (added on a cluster
    # this node left, or whose log it has not caught up with yet) are left alone.
    assert plan(removed, view) == [PruneModel(model_id=hub.model_id)]
    again = state_of(
        ModelAdded(card=hub), ModelRemoved(model_id=hub.model_id), ModelAdded(card=hub)
    )
    assert plan(again, view) == []


def test_files_gone_are_hub_models_this_node_reported_and_no_longer_holds() -> None:
    hub = SMOLLM2_135M_INSTRUCT.model_copy(
        update={"model_id": ModelId("org/chat"), "source": f"hf:org/chat@{'a' * 40}"}
    )
    builtin = SMOLLM2_135M_INSTRUCT.model_id

    def progress(node: NodeId, model: ModelId, complete: bool = True) -> ModelStoreProgress:
        return ModelStoreProgress(
            node_id=node, model_id=model, done_bytes=1, total_bytes=1, complete=complete
        )

    state = state_of(
        ModelAdded(card=hub),
        progress(ME, hub.model_id),
        progress(OTHER, hub.model_id),
        # The built-in model is converted, never fetched from a peer: not a hub model.
        progress(ME, builtin),
    )
    assert files_gone(state, ME, frozenset({hub.model_id})) == []
    assert files_gone(state, ME, frozenset()) == [hub.model_id]
    assert files_gone(state, OTHER, frozenset()) == [hub.model_id]
    # A download this node had begun counts too (its parts are what `stored` lists).
    partial = state_of(ModelAdded(card=hub), progress(ME, hub.model_id, complete=False))
    assert files_gone(partial, ME, frozenset()) == [hub.model_id]
    # Once reported, the state no longer counts it.
    reported = state_of(
        ModelAdded(card=hub),
        progress(ME, hub.model_id),
        ModelFilesRemoved(node_id=ME, model_id=hub.model_id),
    )
    assert files_gone(reported, ME, frozenset()) == []
