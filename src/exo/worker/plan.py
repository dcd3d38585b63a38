"""The worker's pure half: cluster state + what this node is doing -> what to do next."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance, ShardAssignment
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
    # Pipeline stages already told where their next stage listens.
    linked: frozenset[RunnerId] = frozenset()
    # Hub models this node's store holds files of.
    stored: frozenset[ModelId] = frozenset()


class SpawnRunner(Frozen):
    kind: Literal["spawn_runner"] = "spawn_runner"
    instance_id: InstanceId
    model_id: ModelId
    shard: ShardAssignment
    # A stage of a multi-stage instance: it needs a listen port and a link.
    pipeline: bool = False
    # This stage is CPU stage `cpu_slot` of the `cpu_slots` that its instance runs on this
    # node: with more than one, each gets a share of the cores (supervisor.runner_env).
    cpu_slot: int = 0
    cpu_slots: int = 1


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


class LinkStage(Frozen):
    """Tell a local pipeline stage where the next stage (from the last: the first) listens."""

    kind: Literal["link_stage"] = "link_stage"
    runner_id: RunnerId
    host: str
    port: int


class PruneModel(Frozen):
    """Delete the local files of a model the cluster removed from its catalogue."""

    kind: Literal["prune_model"] = "prune_model"
    model_id: ModelId


Action = Annotated[
    SpawnRunner | StopRunner | DispatchTask | AbortTask | LinkStage | PruneModel,
    Field(discriminator="kind"),
]


def next_stage_address(
    state: State, instance: Instance, index: int, node_id: NodeId
) -> tuple[str, int] | None:
    """Where stage `index`'s successor in the ring listens, once it reported it; loopback
    when that stage runs on this node (local hand-offs never leave the machine)."""
    successor = instance.shards[(index + 1) % len(instance.shards)]
    endpoint = state.runner_endpoints.get(successor.runner_id)
    if endpoint is None:
        return None
    host = "127.0.0.1" if endpoint.node_id == node_id else endpoint.host
    return host, endpoint.port


def all_serving(state: State, instance: Instance) -> bool:
    """Every stage's runner is loaded and linked: the instance may take tasks."""
    for shard in instance.shards:
        status = state.runners.get(shard.runner_id)
        if status is None or status.kind not in SERVING_RUNNER_KINDS:
            return False
    return True


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
            here = [s for s in instance.shards if s.node_id == view.node_id and s.device == "cpu"]
            actions.append(
                SpawnRunner(
                    instance_id=instance.instance_id,
                    model_id=instance.model_id,
                    shard=shard,
                    pipeline=len(instance.shards) > 1,
                    cpu_slot=here.index(shard) if shard in here else 0,
                    cpu_slots=len(here) if shard in here else 1,
                )
            )
    for runner_id, (instance, shard) in sorted(mine.items()):
        if (
            len(instance.shards) > 1
            and instance.failed_reason is None
            and runner_id in view.alive
            and runner_id not in view.linked
        ):
            address = next_stage_address(
                state, instance, instance.shards.index(shard), view.node_id
            )
            if address is not None:
                actions.append(LinkStage(runner_id=runner_id, host=address[0], port=address[1]))
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
        # A pipeline takes tasks once every stage serves (wherever it runs); the first
        # stage's node dispatches, the others learn of the task from its BEGIN frame.
        if (
            first.node_id == view.node_id
            and first.runner_id in view.alive
            and all_serving(state, instance)
        ):
            actions.append(DispatchTask(task_id=task.task_id, runner_id=first.runner_id))
    for model_id in sorted(view.stored):
        if model_id in state.removed_models and model_id not in state.models:
            actions.append(PruneModel(model_id=model_id))
    return actions


def files_gone(state: State, node_id: NodeId, stored: frozenset[ModelId]) -> list[ModelId]:
    """Hub models the state counts this node as holding files of (its own progress reports)
    while its store holds none: removed while the daemon was down, by the store's size limit,
    or by hand. Peers would otherwise keep asking it for them."""
    return sorted(
        p.model_id
        for p in state.model_progress.values()
        if p.node_id == node_id and p.model_id in state.models and p.model_id not in stored
    )
