// The pure fold of exo's event log, a line-for-line port of src/exo/shared/apply.py.
// No I/O, no clock: the same events give the same state as on every node.

import type {
  Event,
  IndexedEvent,
  Instance,
  InstanceId,
  InstanceMeasured,
  NodeId,
  RunnerId,
  RunnerStatus,
  State,
  Task,
  TaskId,
} from './types';
import { isKnownEvent, MEASURED_WINDOW } from './types';
import type { NodeDevices } from './telemetry';

export class ApplyError extends Error {}

/** Thrown for an event kind this dashboard cannot fold: the caller resyncs from /state. */
export class UnknownEventError extends Error {
  constructor(readonly kind: string) {
    super(`unknown event kind ${kind}`);
  }
}

export function apply(state: State, indexed: IndexedEvent): State {
  if (indexed.index !== state.last_index + 1) {
    throw new ApplyError(`event index ${indexed.index} does not follow ${state.last_index}`);
  }
  if (indexed.term < state.term) {
    throw new ApplyError(`event term ${indexed.term} is older than ${state.term}`);
  }
  if (!isKnownEvent(indexed.event)) throw new UnknownEventError(indexed.event.kind);
  const next = applyEvent(state, indexed.event);
  const previous = next.origin_seqs[indexed.origin] ?? -1;
  return {
    ...next,
    last_index: indexed.index,
    term: indexed.term,
    origin_seqs: { ...next.origin_seqs, [indexed.origin]: Math.max(previous, indexed.origin_seq) },
  };
}

export function fold(state: State, events: Iterable<IndexedEvent>): State {
  for (const e of events) state = apply(state, e);
  return state;
}

function applyEvent(state: State, event: Event): State {
  switch (event.kind) {
    case 'node_started':
      return nodeStarted(state, event);
    case 'instance_created': {
      // An instance id is created once; a repeat changes nothing (as in the Python apply).
      if (event.instance.instance_id in state.instances) return state;
      const runners = { ...state.runners };
      for (const shard of event.instance.shards) runners[shard.runner_id] = { kind: 'spawning' };
      // As pydantic fills them: an event from an older daemon lacks these fields.
      const instance: Instance = {
        ...event.instance,
        prediction: event.instance.prediction ?? null,
        measured: event.instance.measured ?? null,
      };
      return { ...state, instances: { ...state.instances, [instance.instance_id]: instance }, runners };
    }
    case 'instance_deleted':
      return deleteInstance(state, event.instance_id);
    case 'runner_status_changed':
      return runnerStatus(state, event.runner_id, event.status);
    case 'task_created':
      if (!(event.task.instance_id in state.instances)) return countFailed(state, 1);
      return { ...state, tasks: { ...state.tasks, [event.task.task_id]: event.task } };
    case 'task_started':
    case 'task_first_token': {
      const task = state.tasks[event.task_id];
      if (task === undefined || task.status === 'running') return state;
      return { ...state, tasks: { ...state.tasks, [event.task_id]: { ...task, status: 'running' } } };
    }
    case 'task_finished': {
      const task = state.tasks[event.task_id];
      if (task === undefined) return state;
      const measured = measure(state, task.instance_id, event);
      return {
        ...measured,
        tasks: without(state.tasks, new Set([event.task_id])),
        counters: {
          ...state.counters,
          finished: state.counters.finished + 1,
          completion_tokens: state.counters.completion_tokens + event.completion_tokens,
        },
      };
    }
    case 'task_failed':
    case 'task_cancelled':
      if (!(event.task_id in state.tasks)) return state;
      return dropFailedTasks(state, new Set([event.task_id]));
    case 'model_added': {
      const removed = { ...(state.removed_models ?? {}) };
      delete removed[event.card.model_id];
      return {
        ...state,
        models: { ...(state.models ?? {}), [event.card.model_id]: event.card },
        removed_models: removed,
      };
    }
    case 'model_removed': {
      const card = state.models?.[event.model_id];
      if (card === undefined) return state;
      const models = { ...state.models };
      delete models[event.model_id];
      const progress = Object.fromEntries(
        Object.entries(state.model_progress).filter(([, p]) => p.model_id !== event.model_id),
      );
      return {
        ...state,
        models,
        model_progress: progress,
        removed_models: { ...(state.removed_models ?? {}), [event.model_id]: card.source },
      };
    }
    case 'model_store_progress':
      return {
        ...state,
        model_progress: { ...state.model_progress, [`${event.node_id}/${event.model_id}`]: event },
      };
    case 'model_files_removed': {
      const key = `${event.node_id}/${event.model_id}`;
      if (!(key in state.model_progress)) return state;
      const progress = { ...state.model_progress };
      delete progress[key];
      return { ...state, model_progress: progress };
    }
    case 'device_inventory_reported': {
      const nodes = state.node_devices ?? {};
      const old = nodes[event.node_id];
      const present = new Set(event.devices.map((d) => d.device_id));
      // Figures of devices that are gone go with them; those still present are kept.
      const metrics: NodeDevices['metrics'] = {};
      for (const [k, m] of Object.entries(old?.metrics ?? {})) if (present.has(k)) metrics[k] = m;
      const node: NodeDevices = {
        devices: event.devices,
        metrics,
        inventory_at_ms: event.reported_at_ms,
        metrics_at_ms: old?.metrics_at_ms ?? 0,
      };
      return { ...state, node_devices: { ...nodes, [event.node_id]: node } };
    }
    case 'device_metrics_reported': {
      const nodes = state.node_devices ?? {};
      const old = nodes[event.node_id];
      if (old === undefined) return state; // figures without an inventory describe nothing
      const present = new Set(old.devices.map((d) => d.device_id));
      const metrics = { ...old.metrics };
      for (const [k, m] of Object.entries(event.metrics)) if (present.has(k)) metrics[k] = m;
      const node: NodeDevices = {
        ...old,
        metrics,
        metrics_at_ms: Math.max(old.metrics_at_ms, event.reported_at_ms),
      };
      return { ...state, node_devices: { ...nodes, [event.node_id]: node } };
    }
    case 'link_profile_measured': {
      const links = state.links ?? {};
      return {
        ...state,
        links: { ...links, [event.source]: { ...(links[event.source] ?? {}), [event.target]: event.profile } },
      };
    }
    case 'runner_endpoint_reported': {
      if (!(event.runner_id in state.runners)) return state; // its instance is already gone
      const endpoints = state.runner_endpoints ?? {};
      return { ...state, runner_endpoints: { ...endpoints, [event.runner_id]: event.endpoint } };
    }
    case 'master_elected':
      return { ...state, master: event.node_id };
    case 'member_joined':
      return nodeStatus(state, event.node_id, 'up');
    case 'member_left':
      return nodeLost(state, event.node_id, 'left the cluster');
    case 'member_timed_out':
      return nodeLost(state, event.node_id, `timed out (silent for ${event.silent_ms} ms)`);
    case 'command_decided':
      return state; // read by the consensus core (exactly-once commands), not by state
  }
}

function nodeStatus(state: State, nodeId: NodeId, status: 'up' | 'down'): State {
  const info = state.nodes[nodeId];
  if (info === undefined || info.status === status) return state;
  return { ...state, nodes: { ...state.nodes, [nodeId]: { ...info, status } } };
}

/** A member is gone: its instances fail (to be re-placed), its tasks cannot finish. */
function nodeLost(state: State, nodeId: NodeId, why: string): State {
  state = nodeStatus(state, nodeId, 'down');
  const reason = `node ${nodeId} ${why}`;
  const instances = { ...state.instances };
  const failed = new Set<InstanceId>();
  for (const instance of Object.values(state.instances)) {
    if (instance.failed_reason === null && instance.shards.some((s) => s.node_id === nodeId)) {
      instances[instance.instance_id] = { ...instance, failed_reason: reason };
      failed.add(instance.instance_id);
    }
  }
  state = { ...state, instances };
  const lost = new Set<TaskId>();
  for (const [id, task] of Object.entries(state.tasks)) {
    if (task.owner === nodeId || failed.has(task.instance_id)) lost.add(id);
  }
  return dropFailedTasks(state, lost);
}

function nodeStarted(state: State, event: Extract<Event, { kind: 'node_started' }>): State {
  const info = {
    node_id: event.node_id,
    session: event.session,
    hostname: event.hostname,
    api_port: event.api_port,
    started_at_ms: event.started_at_ms,
    status: 'up' as const,
  };
  state = { ...state, nodes: { ...state.nodes, [event.node_id]: info } };
  // The old process's connections and runners are gone: its tasks cannot finish.
  const lost = new Set<TaskId>();
  for (const [id, task] of Object.entries(state.tasks)) {
    if (task.owner === event.node_id || taskRunsOn(state, task, event.node_id)) lost.add(id);
  }
  return dropFailedTasks(state, lost);
}

function taskRunsOn(state: State, task: Task, nodeId: NodeId): boolean {
  const instance = state.instances[task.instance_id];
  return instance !== undefined && instance.shards.some((s) => s.node_id === nodeId);
}

function runnerStatus(state: State, runnerId: RunnerId, status: RunnerStatus): State {
  if (!(runnerId in state.runners)) return state; // a late report after its instance left
  state = { ...state, runners: { ...state.runners, [runnerId]: status } };
  if (status.kind !== 'failed') return state;
  const instance = Object.values(state.instances).find((i) =>
    i.shards.some((s) => s.runner_id === runnerId),
  );
  if (instance === undefined || instance.failed_reason !== null) return state;
  const failed: Instance = { ...instance, failed_reason: status.reason };
  state = { ...state, instances: { ...state.instances, [instance.instance_id]: failed } };
  return dropFailedTasks(state, tasksOf(state, instance.instance_id));
}

function deleteInstance(state: State, instanceId: InstanceId): State {
  const instance = state.instances[instanceId];
  if (instance === undefined) return state;
  state = dropFailedTasks(state, tasksOf(state, instanceId));
  const runnerIds = new Set(instance.shards.map((s) => s.runner_id));
  const next: State = {
    ...state,
    instances: without(state.instances, new Set([instanceId])),
    runners: without(state.runners, runnerIds),
  };
  if (state.runner_endpoints !== undefined) next.runner_endpoints = without(state.runner_endpoints, runnerIds);
  return next;
}

function tasksOf(state: State, instanceId: InstanceId): Set<TaskId> {
  return new Set(
    Object.values(state.tasks)
      .filter((t) => t.instance_id === instanceId)
      .map((t) => t.task_id),
  );
}

function dropFailedTasks(state: State, taskIds: Set<TaskId>): State {
  if (taskIds.size === 0) return state;
  return countFailed({ ...state, tasks: without(state.tasks, taskIds) }, taskIds.size);
}

function countFailed(state: State, n: number): State {
  return { ...state, counters: { ...state.counters, failed: state.counters.failed + n } };
}

/** The instance's measured decode tokens/s: the last MEASURED_WINDOW tasks and their mean.
 * A task of fewer than two tokens has no decode rate and is not counted. */
function measure(
  state: State,
  instanceId: InstanceId,
  event: Extract<Event, { kind: 'task_finished' }>,
): State {
  const instance = state.instances[instanceId];
  if (instance === undefined || event.completion_tokens < 2 || event.decode_tokens_per_s <= 0) return state;
  const old = instance.measured ?? null;
  const recent = [...(old?.recent_decode_tokens_per_s ?? []), event.decode_tokens_per_s].slice(-MEASURED_WINDOW);
  let total = 0;
  for (const rate of recent) total += rate; // left to right, as the Python fold sums
  const measured: InstanceMeasured = {
    measured_tasks: (old?.measured_tasks ?? 0) + 1,
    last_decode_tokens_per_s: event.decode_tokens_per_s,
    recent_decode_tokens_per_s: recent,
    mean_decode_tokens_per_s: total / recent.length,
  };
  return { ...state, instances: { ...state.instances, [instanceId]: { ...instance, measured } } };
}

function without<V>(record: Record<string, V>, keys: Set<string>): Record<string, V> {
  const out: Record<string, V> = {};
  for (const [k, v] of Object.entries(record)) if (!keys.has(k)) out[k] = v;
  return out;
}
