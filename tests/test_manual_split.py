"""Manual pipeline splits: the master's pure validation and its place in decide()."""

import pytest

from exo.master.decide import DecideContext, Decision, Rejection, decide
from exo.master.manual_split import validate_manual_split
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.apply import fold
from exo.shared.types.commands import CommandEnvelope, PinnedStage, PlaceInstance
from exo.shared.types.events import (
    DeviceInventoryReported,
    Event,
    InstanceCreated,
    NodeStarted,
    RunnerStatusChanged,
)
from exo.shared.types.ids import CommandId, InstanceId, RunnerId
from exo.shared.types.runners import RunnerReady
from exo.shared.types.state import State
from tests.factories import INSTANCES, MODEL, NODES, device, indexed, instance, runner_of

CARD = SMOLLM2_135M_INSTRUCT
A, B = NODES
RUNNERS = [RunnerId(f"run-{i}") for i in range(8)]


def up(node: str) -> NodeStarted:
    return NodeStarted(node_id=node, session="s", hostname="h", api_port=1, started_at_ms=0)  # pyright: ignore[reportArgumentType]


def state_of(*events: Event) -> State:
    return fold(State(), indexed(list(events)))


STATE = state_of(
    up(A),
    up(B),
    DeviceInventoryReported(node_id=B, devices=(device("cpu"), device("cuda:0")), reported_at_ms=0),
)


def stage(node: str, start: int, end: int, engine: str = "mlx", dev: str = "cpu") -> PinnedStage:
    return PinnedStage(node_id=node, device=dev, engine=engine, start_layer=start, end_layer=end)  # pyright: ignore[reportArgumentType]


def test_a_valid_split_becomes_shards_in_pipeline_order() -> None:
    split = [stage(A, 0, 10), stage(B, 10, 22, "torch", "cuda:0"), stage(A, 22, 30)]
    shards = validate_manual_split(CARD, STATE, split, RUNNERS)
    assert isinstance(shards, tuple)
    assert [(s.node_id, s.engine, s.start_layer, s.end_layer) for s in shards] == [
        (A, "mlx", 0, 10),
        (B, "torch", 10, 22),
        (A, "mlx", 22, 30),
    ]
    assert [s.runner_id for s in shards] == RUNNERS[:3]
    assert all(s.n_layers == 30 for s in shards)


@pytest.mark.parametrize(
    ("split", "code", "at"),
    [
        ([], "no_stages", None),
        ([stage(A, 0, 10), stage(A, 12, 30)], "not_contiguous", 1),
        ([stage(A, 0, 20), stage(A, 15, 30)], "not_contiguous", 1),
        ([stage(A, 5, 30)], "not_contiguous", 0),
        ([stage(A, 0, 10), stage(A, 10, 10)], "empty_range", 1),
        ([stage(A, 0, 10), stage(A, 10, 29)], "incomplete", None),
        ([stage(A, 0, 10), stage(A, 10, 31)], "beyond_model", 1),
        ([stage(A, 0, 10), stage("node-zz", 10, 30)], "unknown_node", 1),
        ([stage(A, 0, 10), stage(B, 10, 30, "tensorflow")], "unknown_engine", 1),
        ([stage(A, 0, 10), stage(A, 10, 30, dev="cuda:0")], "unknown_device", 1),
        ([stage(A, i, i + 1) for i in range(30)], "too_many_stages", None),
    ],
)
def test_bad_splits_are_rejected_with_a_typed_reason(
    split: list[PinnedStage], code: str, at: int | None
) -> None:
    rejected = validate_manual_split(CARD, STATE, split, RUNNERS)
    assert not isinstance(rejected, tuple)
    assert (rejected.code, rejected.stage) == (code, at)
    assert rejected.describe().startswith(code)


CTX = DecideContext(
    now_ms=5, new_instance_id=InstanceId("inst-new"), new_runner_ids=RUNNERS, default_engine="mlx"
)


def run(state: State, command: PlaceInstance) -> Decision | Rejection:
    envelope = CommandEnvelope(command_id=CommandId("c"), origin=A, command=command)
    return decide(state, envelope, lambda m: CARD if m == MODEL else None, CTX)


def test_decide_places_a_manual_split_even_beside_a_serving_instance() -> None:
    serving = state_of(
        up(A),
        InstanceCreated(instance=instance(INSTANCES[0], A)),
        RunnerStatusChanged(runner_id=runner_of(INSTANCES[0]), status=RunnerReady()),
    )
    out = run(serving, PlaceInstance(model_id=MODEL, stages=(stage(A, 0, 15), stage(A, 15, 30))))
    assert isinstance(out, Decision) and out.created_id == "inst-new"
    (created,) = out.events
    assert isinstance(created, InstanceCreated)
    assert len(created.instance.shards) == 2
    assert created.instance.prediction is None


def test_decide_rejects_a_bad_split_as_invalid_split() -> None:
    out = run(STATE, PlaceInstance(model_id=MODEL, stages=(stage(A, 0, 15),)))
    assert isinstance(out, Rejection)
    assert out.code == "invalid_split" and "incomplete" in out.message
