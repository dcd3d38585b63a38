"""The pure fold of the event log into `State`: no I/O, no clock, no randomness."""

from collections.abc import Iterable
from typing import Literal, TypeVar

from exo.shared.types.events import (
    CommandDecided,
    DeviceInventoryReported,
    DeviceMetricsReported,
    Event,
    IndexedEvent,
    InstanceCreated,
    InstanceDeleted,
    LinkProfileMeasured,
    MasterElected,
    MemberJoined,
    MemberLeft,
    MemberTimedOut,
    ModelAdded,
    ModelFilesRemoved,
    ModelRemoved,
    ModelStoreProgress,
    NodeStarted,
    RunnerEndpointReported,
    RunnerStatusChanged,
    TaskCancelled,
    TaskCreated,
    TaskFailed,
    TaskFinished,
    TaskFirstToken,
    TaskStarted,
)
from exo.shared.types.ids import InstanceId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import MEASURED_WINDOW, InstanceMeasured
from exo.shared.types.runners import RunnerFailed, RunnerSpawning, RunnerStatus
from exo.shared.types.state import NodeInfo, State, TaskCounters
from exo.shared.types.tasks import Task
from exo.shared.types.telemetry import NodeDevices

K = TypeVar("K")
V = TypeVar("V")


class ApplyError(ValueError):
    """An indexed event that cannot follow the state (wrong index or stale term)."""


def apply(state: State, indexed: IndexedEvent) -> State:
    if indexed.index != state.last_index + 1:
        raise ApplyError(f"event index {indexed.index} does not follow {state.last_index}")
    if indexed.term < state.term:
        raise ApplyError(f"event term {indexed.term} is older than {state.term}")
    next_state = _apply_event(state, indexed.event)
    origin_seqs = dict(next_state.origin_seqs)
    origin_seqs[indexed.origin] = max(origin_seqs.get(indexed.origin, -1), indexed.origin_seq)
    return next_state.model_copy(
        update={"last_index": indexed.index, "term": indexed.term, "origin_seqs": origin_seqs}
    )


def fold(state: State, events: Iterable[IndexedEvent]) -> State:
    for indexed in events:
        state = apply(state, indexed)
    return state


def _apply_event(state: State, event: Event) -> State:
    match event:
        case NodeStarted():
            return _node_started(state, event)
        case InstanceCreated(instance=instance):
            if instance.instance_id in state.instances:
                return state  # an instance id is created once; a repeat changes nothing
            instances = {**state.instances, instance.instance_id: instance}
            runners = dict(state.runners)
            for shard in instance.shards:
                runners[shard.runner_id] = RunnerSpawning()
            return state.model_copy(update={"instances": instances, "runners": runners})
        case InstanceDeleted(instance_id=instance_id, reason=reason):
            return _delete_instance(state, instance_id, reason)
        case RunnerStatusChanged(runner_id=runner_id, status=status):
            return _runner_status(state, runner_id, status)
        case RunnerEndpointReported(runner_id=runner_id, endpoint=endpoint):
            if runner_id not in state.runners:
                return state  # its instance is already gone
            endpoints = {**state.runner_endpoints, runner_id: endpoint}
            return state.model_copy(update={"runner_endpoints": endpoints})
        case TaskCreated(task=task):
            if task.instance_id not in state.instances:
                return _count_failed(state, 1)
            return state.model_copy(update={"tasks": {**state.tasks, task.task_id: task}})
        case TaskStarted(task_id=task_id) | TaskFirstToken(task_id=task_id):
            task = state.tasks.get(task_id)
            if task is None or task.status == "running":
                return state
            running = task.model_copy(update={"status": "running"})
            return state.model_copy(update={"tasks": {**state.tasks, task_id: running}})
        case TaskFinished(task_id=task_id, completion_tokens=completion_tokens):
            if task_id not in state.tasks:
                return state
            counters = state.counters.model_copy(
                update={
                    "finished": state.counters.finished + 1,
                    "completion_tokens": state.counters.completion_tokens + completion_tokens,
                }
            )
            measured = _measure(state, state.tasks[task_id].instance_id, event)
            return measured.model_copy(
                update={"tasks": _without(state.tasks, {task_id}), "counters": counters}
            )
        case TaskFailed(task_id=task_id) | TaskCancelled(task_id=task_id):
            if task_id not in state.tasks:
                return state
            return _drop_failed_tasks(state, {task_id})
        case ModelAdded(card=card):
            removed = {m: s for m, s in state.removed_models.items() if m != card.model_id}
            models = {**state.models, card.model_id: card}
            return state.model_copy(update={"models": models, "removed_models": removed})
        case ModelRemoved(model_id=model_id):
            card = state.models.get(model_id)
            if card is None:
                return state
            progress = {key: p for key, p in state.model_progress.items() if p.model_id != model_id}
            models = {m: c for m, c in state.models.items() if m != model_id}
            removed = {**state.removed_models, model_id: card.source}
            return state.model_copy(
                update={"models": models, "model_progress": progress, "removed_models": removed}
            )
        case ModelStoreProgress():
            key = f"{event.node_id}/{event.model_id}"
            return state.model_copy(update={"model_progress": {**state.model_progress, key: event}})
        case ModelFilesRemoved(node_id=node_id, model_id=model_id):
            key = f"{node_id}/{model_id}"
            if key not in state.model_progress:
                return state
            return state.model_copy(
                update={"model_progress": _without(state.model_progress, {key})}
            )
        case DeviceInventoryReported():
            return _device_inventory(state, event)
        case DeviceMetricsReported():
            return _device_metrics(state, event)
        case LinkProfileMeasured(source=source, target=target, profile=profile):
            links = {**state.links, source: {**state.links.get(source, {}), target: profile}}
            return state.model_copy(update={"links": links})
        case MasterElected(node_id=node_id):
            return state.model_copy(update={"master": node_id})
        case MemberJoined(node_id=node_id):
            return _node_status(state, node_id, "up")
        case MemberLeft(node_id=node_id):
            return _node_lost(state, node_id, "left the cluster")
        case MemberTimedOut(node_id=node_id, silent_ms=silent_ms):
            return _node_lost(state, node_id, f"timed out (silent for {silent_ms} ms)")
        case CommandDecided():
            return state  # read by the consensus core (exactly-once commands), not by state


def _device_inventory(state: State, event: DeviceInventoryReported) -> State:
    old = state.node_devices.get(event.node_id, NodeDevices())
    present = {d.device_id for d in event.devices}
    # Figures of devices that are gone go with them; those still present are kept.
    node = NodeDevices(
        devices=event.devices,
        metrics={k: m for k, m in old.metrics.items() if k in present},
        inventory_at_ms=event.reported_at_ms,
        metrics_at_ms=old.metrics_at_ms,
    )
    return state.model_copy(update={"node_devices": {**state.node_devices, event.node_id: node}})


def _device_metrics(state: State, event: DeviceMetricsReported) -> State:
    old = state.node_devices.get(event.node_id)
    if old is None:
        return state  # figures without an inventory describe nothing placement can use
    present = {d.device_id for d in old.devices}
    metrics = {**old.metrics, **{k: m for k, m in event.metrics.items() if k in present}}
    node = old.model_copy(
        update={"metrics": metrics, "metrics_at_ms": max(old.metrics_at_ms, event.reported_at_ms)}
    )
    return state.model_copy(update={"node_devices": {**state.node_devices, event.node_id: node}})


def _node_started(state: State, event: NodeStarted) -> State:
    info = NodeInfo(
        node_id=event.node_id,
        session=event.session,
        hostname=event.hostname,
        api_port=event.api_port,
        started_at_ms=event.started_at_ms,
    )
    state = state.model_copy(update={"nodes": {**state.nodes, event.node_id: info}})
    # The old process's connections and runners are gone: its tasks cannot finish.
    lost = {
        task_id
        for task_id, task in state.tasks.items()
        if task.owner == event.node_id or _task_runs_on(state, task, event.node_id)
    }
    return _drop_failed_tasks(state, lost)


def _node_status(state: State, node_id: NodeId, status: Literal["up", "down"]) -> State:
    info = state.nodes.get(node_id)
    if info is None or info.status == status:
        return state
    nodes = {**state.nodes, node_id: info.model_copy(update={"status": status})}
    return state.model_copy(update={"nodes": nodes})


def _node_lost(state: State, node_id: NodeId, why: str) -> State:
    """A member is gone: its instances fail (to be re-placed), its tasks cannot finish."""
    state = _node_status(state, node_id, "down")
    reason = f"node {node_id} {why}"
    instances = dict(state.instances)
    failed: set[InstanceId] = set()
    for instance in state.instances.values():
        if instance.failed_reason is None and any(s.node_id == node_id for s in instance.shards):
            instances[instance.instance_id] = instance.model_copy(update={"failed_reason": reason})
            failed.add(instance.instance_id)
    state = state.model_copy(update={"instances": instances})
    lost = {
        task_id
        for task_id, task in state.tasks.items()
        if task.owner == node_id or task.instance_id in failed
    }
    return _drop_failed_tasks(state, lost)


def _task_runs_on(state: State, task: Task, node_id: NodeId) -> bool:
    instance = state.instances.get(task.instance_id)
    return instance is not None and any(s.node_id == node_id for s in instance.shards)


def _runner_status(state: State, runner_id: RunnerId, status: RunnerStatus) -> State:
    if runner_id not in state.runners:
        return state  # a late report from a runner whose instance is already deleted
    state = state.model_copy(update={"runners": {**state.runners, runner_id: status}})
    if not isinstance(status, RunnerFailed):
        return state
    instance = next(
        (i for i in state.instances.values() if any(s.runner_id == runner_id for s in i.shards)),
        None,
    )
    if instance is None or instance.failed_reason is not None:
        return state
    failed = instance.model_copy(update={"failed_reason": status.reason})
    state = state.model_copy(
        update={"instances": {**state.instances, instance.instance_id: failed}}
    )
    return _drop_failed_tasks(state, _tasks_of(state, instance.instance_id))


def _delete_instance(state: State, instance_id: InstanceId, reason: str) -> State:
    instance = state.instances.get(instance_id)
    if instance is None:
        return state
    state = _drop_failed_tasks(state, _tasks_of(state, instance_id))
    return state.model_copy(
        update={
            "instances": _without(state.instances, {instance_id}),
            "runners": _without(state.runners, {s.runner_id for s in instance.shards}),
            "runner_endpoints": _without(
                state.runner_endpoints, {s.runner_id for s in instance.shards}
            ),
        }
    )


def _tasks_of(state: State, instance_id: InstanceId) -> set[TaskId]:
    return {t.task_id for t in state.tasks.values() if t.instance_id == instance_id}


def _drop_failed_tasks(state: State, task_ids: set[TaskId]) -> State:
    if not task_ids:
        return state
    return _count_failed(
        state.model_copy(update={"tasks": _without(state.tasks, task_ids)}), len(task_ids)
    )


def _count_failed(state: State, n: int) -> State:
    counters: TaskCounters = state.counters.model_copy(update={"failed": state.counters.failed + n})
    return state.model_copy(update={"counters": counters})


def _measure(state: State, instance_id: InstanceId, event: TaskFinished) -> State:
    """The instance's measured decode tokens/s: the last MEASURED_WINDOW tasks and their mean.

    A task of fewer than two tokens has no decode rate and is not counted.
    """
    instance = state.instances.get(instance_id)
    if instance is None or event.completion_tokens < 2 or event.decode_tokens_per_s <= 0:
        return state
    old = instance.measured
    recent = (*(old.recent_decode_tokens_per_s if old else ()), event.decode_tokens_per_s)
    recent = recent[-MEASURED_WINDOW:]
    total = 0.0
    for rate in recent:  # left to right, as the dashboard's fold sums
        total += rate
    measured = InstanceMeasured(
        measured_tasks=(old.measured_tasks if old else 0) + 1,
        last_decode_tokens_per_s=event.decode_tokens_per_s,
        recent_decode_tokens_per_s=recent,
        mean_decode_tokens_per_s=total / len(recent),
    )
    instance = instance.model_copy(update={"measured": measured})
    return state.model_copy(update={"instances": {**state.instances, instance_id: instance}})


def _without(mapping: dict[K, V], keys: set[K]) -> dict[K, V]:
    return {k: v for k, v in mapping.items() if k not in keys}
