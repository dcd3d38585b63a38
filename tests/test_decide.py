"""The master's pure command handling."""

import math
import re
import time

import pytest

from exo.master.decide import DecideContext, Decision, Rejection, decide
from exo.master.placement import PLACE_TIME_LIMIT_S
from exo.models.cards import SMOLLM2_135M_INSTRUCT, card_in
from exo.shared.apply import fold
from exo.shared.types.commands import (
    AddModel,
    CancelTask,
    CommandEnvelope,
    CreateTask,
    DeleteInstance,
    PinnedStage,
    PlaceInstance,
    RemoveModel,
)
from exo.shared.types.engines import EngineName
from exo.shared.types.events import (
    DeviceInventoryReported,
    DeviceMetricsReported,
    Event,
    InstanceCreated,
    InstanceDeleted,
    LinkProfileMeasured,
    ModelAdded,
    ModelRemoved,
    NodeStarted,
    RunnerStatusChanged,
    TaskCreated,
)
from exo.shared.types.ids import CommandId, InstanceId, ModelId, NodeId, RunnerId
from exo.shared.types.instances import Instance
from exo.shared.types.placement import CostParams
from exo.shared.types.runners import RunnerFailed
from exo.shared.types.state import State
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, LinkProfile, PerfFigure
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
    # A KV context beyond what the model was trained for is a bad request, not a lack of room.
    assert run(state, PlaceInstance(model_id=MODEL, context_length=8193)) == Rejection(
        code="invalid",
        message=f"context_length 8193 is above the 8192-token context of {MODEL}",
    )
    out = run(state, PlaceInstance(model_id=MODEL, context_length=8192))
    assert isinstance(out, Decision) and out.created_id == "inst-new"


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


# --- placement through the solver ---------------------------------------------------------

GIB = 1 << 30


def free_leaving(room: int, engine: EngineName) -> int:
    """Free bytes on a CPU whose runner has `room` usable bytes beyond its overhead."""
    params = CostParams()
    return math.ceil((params.overhead_bytes("cpu", engine) + room) / (1 - params.memory_margin))


ENGINE_CTX = CTX.model_copy(
    update={"new_runner_ids": [RunnerId(f"run-{i}") for i in range(8)], "default_engine": "torch"}
)


def cpu(node: NodeId, free_bytes: int, bandwidth: float) -> tuple[Event, Event, Event]:
    """An up node with one CPU device, as its telemetry reports it."""
    spec = DeviceSpec(
        device_id="cpu",
        kind="cpu",
        name="AMD EPYC",
        index=0,
        memory_total_bytes=free_bytes * 2,
        memory_pool="host",
        memory_bandwidth=PerfFigure(value=bandwidth, source="measured", detail="test"),
        compute=PerfFigure(value=1e11, source="measured", detail="test"),
    )
    return (
        NodeStarted(node_id=node, session="s", hostname=node, api_port=1, started_at_ms=0),
        DeviceInventoryReported(node_id=node, devices=(spec,), reported_at_ms=0),
        DeviceMetricsReported(
            node_id=node,
            metrics={"cpu": DeviceMetrics(memory_free_bytes=free_bytes)},
            reported_at_ms=0,
        ),
    )


def link_between(a: NodeId, b: NodeId) -> Event:
    profile = LinkProfile(
        rtt_ms=0.2,
        rtt_min_ms=0.1,
        bandwidth_bytes_per_s=1.25e9,
        ping_samples=10,
        bulk_bytes=1 << 20,
        measured_at_ms=0,
    )
    return LinkProfileMeasured(source=a, target=b, profile=profile)


def placed(state: State, command: PlaceInstance | None = None) -> Instance:
    envelope = CommandEnvelope(
        command_id=CommandId("c"), origin=NODES[0], command=command or PlaceInstance(model_id=MODEL)
    )
    out = decide(state, envelope, lambda m: CARD if m == MODEL else None, ENGINE_CTX)
    assert isinstance(out, Decision), out
    created = out.events[-1]
    assert isinstance(created, InstanceCreated)
    return created.instance


def test_latency_places_one_stage_on_the_fastest_device_that_fits() -> None:
    a, b = NODES
    state = state_of(*cpu(a, 8 * GIB, 20e9), *cpu(b, 8 * GIB, 60e9), link_between(a, b))
    instance = placed(state)
    (shard,) = instance.shards
    assert (shard.node_id, shard.device, shard.engine) == (b, "cpu", "torch")
    assert (shard.start_layer, shard.end_layer, shard.n_layers) == (0, 30, 30)
    p = instance.prediction
    assert p is not None and p.objective == "latency" and p.solver_status == "optimal"
    assert p.tokens_per_s == pytest.approx(1 / p.time_per_token_s)
    assert [s.device_id for s in p.stages] == [f"{b}/cpu"]
    # A pin keeps it on the slower node; a named engine runs there.
    pinned = placed(state, PlaceInstance(model_id=MODEL, node_id=a, engine="mlx"))
    assert [(s.node_id, s.engine) for s in pinned.shards] == [(a, "mlx")]


def test_the_command_s_solver_options_reach_the_solver() -> None:
    a, b = NODES
    state = state_of(*cpu(a, 8 * GIB, 20e9), *cpu(b, 8 * GIB, 60e9), link_between(a, b))
    # Excluding the fast node (by node or by device) leaves the slow one.
    for command in (
        PlaceInstance(model_id=MODEL, exclude_nodes=(b,)),
        PlaceInstance(model_id=MODEL, exclude_devices=(f"{b}/cpu",)),
        PlaceInstance(model_id=MODEL, include_nodes=(a,), objective="throughput"),
    ):
        instance = placed(state, command)
        assert [s.node_id for s in instance.shards] == [a]
    throughput = placed(state, PlaceInstance(model_id=MODEL, objective="throughput"))
    assert throughput.prediction is not None and throughput.prediction.objective == "throughput"


def test_a_manual_split_is_costed_and_refused_when_it_does_not_fit() -> None:
    a, b = NODES
    state = state_of(*cpu(a, 8 * GIB, 20e9), *cpu(b, 8 * GIB, 60e9), link_between(a, b))

    def split(first: NodeId, second: NodeId) -> PlaceInstance:
        return PlaceInstance(
            model_id=MODEL,
            stages=(
                PinnedStage(node_id=first, engine="torch", start_layer=0, end_layer=10),
                PinnedStage(node_id=second, engine="torch", start_layer=10, end_layer=30),
            ),
        )

    instance = placed(state, split(a, b))
    assert [(s.node_id, s.start_layer) for s in instance.shards] == [(a, 0), (b, 10)]
    p = instance.prediction
    assert p is not None and p.solver_status == "manual" and len(p.stages) == 2
    # Two stages on one device cannot be costed by the model: placed, unpredicted.
    assert placed(state, split(a, a)).prediction is None
    # A stage that does not fit its device's memory is refused with the shortfall.
    tight = state_of(*cpu(a, 100 << 20, 20e9), *cpu(b, 8 * GIB, 60e9), link_between(a, b))
    envelope = CommandEnvelope(command_id=CommandId("c"), origin=a, command=split(a, b))
    refused = decide(tight, envelope, lambda m: CARD if m == MODEL else None, ENGINE_CTX)
    assert isinstance(refused, Rejection) and refused.code == "placement_failed"
    assert "short" in refused.message and f"{a}/cpu" in refused.message


def test_a_model_too_big_for_one_device_is_split_across_linked_nodes() -> None:
    a, b = NODES
    # SmolLM2 needs ~98 MB of weights + 4096 tokens of KV (~189 MB: torch holds it in
    # float32 on CPU) + a torch CPU runner's overhead.
    room = free_leaving(171_000_000, "torch")
    state = state_of(*cpu(a, room, 20e9), *cpu(b, room, 20e9), link_between(a, b))
    instance = placed(state)
    assert [s.node_id for s in instance.shards] in ([a, b], [b, a])
    assert instance.shards[0].start_layer == 0 and instance.shards[-1].end_layer == 30
    assert instance.shards[0].end_layer == instance.shards[1].start_layer
    assert len({s.runner_id for s in instance.shards}) == 2
    assert instance.prediction is not None and len(instance.prediction.stages) == 2


def test_infeasible_placement_says_which_device_is_short_by_how_many_bytes() -> None:
    a = NODES[0]
    out = run(state_of(*cpu(a, 400 * (1 << 20), 20e9)), PlaceInstance(model_id=MODEL))
    assert isinstance(out, Rejection) and out.code == "placement_failed"
    assert "does not fit" in out.message
    assert re.search(rf"{a}/cpu by \d+ bytes", out.message), out.message
    # Without links the two nodes cannot form a pipeline: the reason says so.
    b = NODES[1]
    small = free_leaving(113_000_000, "mlx")
    out = run(state_of(*cpu(a, small, 20e9), *cpu(b, small, 20e9)), PlaceInstance(model_id=MODEL))
    assert isinstance(out, Rejection) and "link" in out.message


def test_a_node_without_telemetry_yet_gets_the_whole_model_unpredicted() -> None:
    instance = placed(state_of(UP))
    assert [(s.node_id, s.engine) for s in instance.shards] == [(NODES[0], "torch")]
    assert instance.prediction is None


def test_placing_is_fast_enough_for_the_event_loop() -> None:
    a, b = NODES
    state = state_of(*cpu(a, 8 * GIB, 20e9), *cpu(b, 8 * GIB, 60e9), link_between(a, b))
    started = time.perf_counter()
    placed(state)
    assert time.perf_counter() - started < PLACE_TIME_LIMIT_S


# --- models added from the hub ------------------------------------------------------------

HUB = SMOLLM2_135M_INSTRUCT.model_copy(
    update={"model_id": ModelId("org/chat"), "source": f"hf:org/chat@{'a' * 40}"}
)


def _add(state: State, command: AddModel | RemoveModel) -> Decision | Rejection:
    envelope = CommandEnvelope(command_id=CommandId("c"), origin=NODES[0], command=command)
    return decide(state, envelope, lambda m: card_in(state, m), CTX)


def test_a_hub_model_joins_the_catalogue_once_and_moves_to_a_new_commit() -> None:
    added = _add(State(), AddModel(card=HUB))
    assert added == Decision(events=(ModelAdded(card=HUB),), created_id="org/chat")
    state = state_of(ModelAdded(card=HUB))
    assert card_in(state, ModelId("org/chat")) == HUB
    assert _add(state, AddModel(card=HUB)) == Decision(created_id="org/chat")
    newer = HUB.model_copy(update={"source": f"hf:org/chat@{'b' * 40}"})
    assert _add(state, AddModel(card=newer)) == Decision(
        events=(ModelAdded(card=newer),), created_id="org/chat"
    )
    assert card_in(state_of(ModelAdded(card=HUB), ModelAdded(card=newer)), HUB.model_id) == newer


def test_a_built_in_model_cannot_be_replaced_from_the_hub() -> None:
    impostor = SMOLLM2_135M_INSTRUCT.model_copy(update={"source": f"hf:org/x@{'a' * 40}"})
    out = _add(State(), AddModel(card=impostor))
    assert isinstance(out, Rejection)
    assert out.code == "invalid"
    assert "built in" in out.message


def test_a_hub_model_is_removed_only_without_instances_and_never_a_built_in_one() -> None:
    state = state_of(UP, ModelAdded(card=HUB))
    gone = _add(state, RemoveModel(model_id=HUB.model_id))
    assert gone == Decision(events=(ModelRemoved(model_id=HUB.model_id),), created_id="org/chat")
    after = state_of(UP, ModelAdded(card=HUB), ModelRemoved(model_id=HUB.model_id))
    assert card_in(after, HUB.model_id) is None
    assert after.removed_models == {HUB.model_id: HUB.source}
    # Added again: back in the catalogue, no longer removed.
    again = state_of(
        UP, ModelAdded(card=HUB), ModelRemoved(model_id=HUB.model_id), ModelAdded(card=HUB)
    )
    assert again.removed_models == {} and card_in(again, HUB.model_id) == HUB
    hub_instance = instance(InstanceId("inst-h"), NODES[0]).model_copy(
        update={"model_id": HUB.model_id}
    )
    used = state_of(UP, ModelAdded(card=HUB), InstanceCreated(instance=hub_instance))
    busy = _add(used, RemoveModel(model_id=HUB.model_id))
    assert isinstance(busy, Rejection) and busy.code == "invalid" and "inst-h" in busy.message
    builtin = _add(state, RemoveModel(model_id=SMOLLM2_135M_INSTRUCT.model_id))
    assert isinstance(builtin, Rejection) and "built in" in builtin.message
    unknown = _add(state, RemoveModel(model_id=ModelId("org/never")))
    assert isinstance(unknown, Rejection) and unknown.code == "unknown_model"
