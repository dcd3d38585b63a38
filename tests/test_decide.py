"""The master's pure command handling."""

from exo.master.decide import DecideContext, Decision, Rejection, decide
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.apply import fold
from exo.shared.types.commands import (
    CancelTask,
    CommandEnvelope,
    CreateTask,
    DeleteInstance,
    PlaceInstance,
)
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    NodeStarted,
    RunnerStatusChanged,
    TaskCreated,
)
from exo.shared.types.ids import CommandId, InstanceId, ModelId, RunnerId
from exo.shared.types.runners import RunnerFailed
from exo.shared.types.state import State
from tests.factories import (
    INSTANCES,
    MODEL,
    NODES,
    TASKS,
    chat_params,
    indexed,
    instance,
    runner_of,
    task,
)

CARD = SMOLLM2_135M_INSTRUCT
CTX = DecideContext(
    now_ms=5,
    new_instance_id=InstanceId("inst-new"),
    new_runner_ids=[RunnerId("run-new")],
    default_engine="mlx",
)
UP = NodeStarted(node_id=NODES[0], session="s", hostname="h", api_port=1, started_at_ms=0)


def run(
    state: State, command: PlaceInstance | DeleteInstance | CreateTask | CancelTask
) -> Decision | Rejection:
    envelope = CommandEnvelope(command_id=CommandId("c"), origin=NODES[0], command=command)
    return decide(state, envelope, lambda m: CARD if m == MODEL else None, CTX)


def state_of(*events: Event) -> State:
    return fold(State(), indexed(list(events)))


def test_place_creates_one_stage_instance_on_an_up_node() -> None:
    out = run(state_of(UP), PlaceInstance(model_id=MODEL))
    assert isinstance(out, Decision) and out.created_id == "inst-new"
    (created,) = out.events
    assert isinstance(created, InstanceCreated)
    (shard,) = created.instance.shards
    assert (shard.node_id, shard.start_layer, shard.end_layer) == (NODES[0], 0, 30)


def test_place_is_idempotent_and_replaces_failed_instances() -> None:
    healthy = state_of(UP, InstanceCreated(instance=instance(INSTANCES[0], NODES[0])))
    out = run(healthy, PlaceInstance(model_id=MODEL))
    assert out == Decision(created_id=INSTANCES[0])
    failed = state_of(
        UP,
        InstanceCreated(instance=instance(INSTANCES[0], NODES[0])),
        RunnerStatusChanged(runner_id=runner_of(INSTANCES[0]), status=RunnerFailed(reason="oom")),
    )
    out = run(failed, PlaceInstance(model_id=MODEL))
    assert isinstance(out, Decision)
    assert isinstance(out.events[0], InstanceDeleted) and isinstance(out.events[1], InstanceCreated)


def test_rejections_are_typed() -> None:
    state = state_of(UP)
    assert run(state, PlaceInstance(model_id=ModelId("nope"))) == Rejection(
        code="unknown_model", message="unknown model nope"
    )
    assert isinstance(run(State(), PlaceInstance(model_id=MODEL)), Rejection)
    create = CreateTask(task_id=TASKS[0], model_id=MODEL, owner=NODES[0], params=chat_params())
    out = run(state, create)
    assert isinstance(out, Rejection) and out.code == "no_instance"
    out = run(state, DeleteInstance(instance_id=InstanceId("missing")))
    assert isinstance(out, Rejection) and out.code == "not_found"


def test_tasks_go_to_a_healthy_instance_and_cancel_is_idempotent() -> None:
    state = state_of(UP, InstanceCreated(instance=instance(INSTANCES[0], NODES[0])))
    create = CreateTask(task_id=TASKS[0], model_id=MODEL, owner=NODES[0], params=chat_params())
    out = run(state, create)
    assert isinstance(out, Decision) and isinstance(out.events[0], TaskCreated)
    assert run(state, CancelTask(task_id=TASKS[0], reason="gone")) == Decision()
    with_task = state_of(
        UP,
        InstanceCreated(instance=instance(INSTANCES[0], NODES[0])),
        TaskCreated(task=task(TASKS[0], INSTANCES[0], NODES[0])),
    )
    out = run(with_task, CancelTask(task_id=TASKS[0], reason="gone"))
    assert isinstance(out, Decision) and len(out.events) == 1
