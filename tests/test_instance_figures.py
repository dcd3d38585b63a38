"""Predicted and measured figures on an instance: the measured fold in `apply`."""

import pytest

from exo.shared.apply import fold
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    NodeStarted,
    TaskCreated,
    TaskFinished,
)
from exo.shared.types.ids import TaskId
from exo.shared.types.instances import MEASURED_WINDOW
from exo.shared.types.state import State
from tests.factories import INSTANCES, NODES, indexed, instance, task

UP = NodeStarted(node_id=NODES[0], session="s", hostname="h", api_port=1, started_at_ms=0)


def finished(i: int, tokens_per_s: float, tokens: int = 16) -> list[Event]:
    task_id = TaskId(f"t{i}")
    return [
        TaskCreated(task=task(task_id, INSTANCES[0], NODES[0])),
        TaskFinished(
            task_id=task_id,
            finish_reason="stop",
            prompt_tokens=5,
            completion_tokens=tokens,
            decode_tokens_per_s=tokens_per_s,
        ),
    ]


def test_finished_tasks_fold_into_the_instances_measured_tokens_per_s() -> None:
    rates = [float(10 + i) for i in range(12)]
    events: list[Event] = [UP, InstanceCreated(instance=instance(INSTANCES[0], NODES[0]))]
    for i, rate in enumerate(rates):
        events += finished(i, rate)
    # One token has no decode rate: not counted.
    events += finished(99, 0.0, tokens=1)
    state = fold(State(), indexed(events))
    measured = state.instances[INSTANCES[0]].measured
    assert measured is not None
    assert measured.measured_tasks == 12
    assert measured.last_decode_tokens_per_s == 21.0
    assert measured.recent_decode_tokens_per_s == tuple(rates[-MEASURED_WINDOW:])
    assert measured.mean_decode_tokens_per_s == pytest.approx(sum(rates[2:]) / 10)
    assert state.counters.finished == 13


def test_no_measure_before_a_task_finishes_nor_for_a_deleted_instance() -> None:
    created: list[Event] = [UP, InstanceCreated(instance=instance(INSTANCES[0], NODES[0]))]
    assert fold(State(), indexed(created)).instances[INSTANCES[0]].measured is None
    gone = [*created, *finished(0, 30.0)[:1], InstanceDeleted(instance_id=INSTANCES[0], reason="x")]
    state = fold(State(), indexed([*gone, *finished(0, 30.0)[1:]]))
    assert state.instances == {}
