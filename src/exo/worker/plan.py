"""The worker's pure half: cluster state + what this node is doing -> what to do next."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import ShardAssignment
from exo.shared.types.runners import SERVING_RUNNER_KINDS
from exo.shared.types.state import State


class WorkerView(Frozen):
    """What only this node knows: its own processes."""

    node_id: NodeId
    # Every runner this process started (alive or not): a runner is never started twice.
    spawned: frozenset[RunnerId] = frozenset()
    alive: frozenset[RunnerId] = frozenset()
    # Tasks handed to a local runner and not yet ended there.
    dispatched: dict[TaskId, RunnerId] = Field(default_factory=dict[TaskId, RunnerId])


class SpawnRunner(Frozen):
    kind: Literal["spawn_runner"] = "spawn_runner"
    instance_id: InstanceId
    model_id: ModelId
    shard: ShardAssignment


class StopRunner(Frozen):
    kind: Literal["stop_runner"] = "stop_runner"
    runner_id: RunnerId
    reason: str


class DispatchTask(Frozen):
    kind: Literal["dispatch_task"] = "dispatch_task"
    task_id: TaskId
    runner_id: RunnerId


class AbortTask(Frozen):
    kind: Literal["abort_task"] = "abort_task"
    task_id: TaskId
    runner_id: RunnerId


Action = Annotated[SpawnRunner | StopRunner | DispatchTask | AbortTask, Field(discriminator="kind")]


def plan(state: State, view: WorkerView) -> list[Action]:
    actions: list[Action] = []
    mine = {
        shard.runner_id: (instance, shard)
        for instance in state.instances.values()
        for shard in instance.shards
        if shard.node_id == view.node_id
    }
    for runner_id in sorted(view.alive):
        entry = mine.get(runner_id)
        if entry is None:
            actions.append(StopRunner(runner_id=runner_id, reason="instance deleted"))
        elif entry[0].failed_reason is not None:
            actions.append(StopRunner(runner_id=runner_id, reason="instance failed"))
    for runner_id, (instance, shard) in sorted(mine.items()):
        if instance.failed_reason is None and runner_id not in view.spawned:
            actions.append(
                SpawnRunner(
                    instance_id=instance.instance_id, model_id=instance.model_id, shard=shard
                )
            )
    for task_id, runner_id in sorted(view.dispatched.items()):
        if task_id not in state.tasks:
            actions.append(AbortTask(task_id=task_id, runner_id=runner_id))
    for task in sorted(state.tasks.values(), key=lambda t: (t.created_at_ms, t.task_id)):
        if task.status != "pending" or task.task_id in view.dispatched:
            continue
        instance = state.instances.get(task.instance_id)
        if instance is None or instance.failed_reason is not None:
            continue
        first = instance.shards[0]
        status = state.runners.get(first.runner_id)
        if (
            first.node_id == view.node_id
            and first.runner_id in view.alive
            and status is not None
            and status.kind in SERVING_RUNNER_KINDS
        ):
            actions.append(DispatchTask(task_id=task.task_id, runner_id=first.runner_id))
    return actions
