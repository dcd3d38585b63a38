// Measured performance per task, gathered from the event stream. The state drops a task
// when it finishes, so its time to first token and tokens/s live only in the events:
// this fold keeps the recent ones for the charts and the instance cards.

import type { IndexedEvent, InstanceId, ModelId, State, TaskId } from './types';

export interface TaskSample {
  task_id: TaskId;
  instance_id: InstanceId;
  model_id: ModelId | null;
  index: number;
  /** Estimated wall time the task finished (created + ttft + decode time), ms since epoch. */
  at_ms: number;
  ttft_ms: number | null;
  tokens_per_s: number;
  completion_tokens: number;
  finish_reason: string;
}

interface OpenTask {
  instance_id: InstanceId;
  created_at_ms: number;
  ttft_ms: number | null;
}

export interface Metrics {
  /** Highest event index observed (events at or below it are not counted twice). */
  last_index: number;
  open: Record<TaskId, OpenTask>;
  models: Record<InstanceId, ModelId>;
  samples: TaskSample[];
}

export const MAX_SAMPLES = 300;
const MAX_OPEN = 200;

export function emptyMetrics(): Metrics {
  return { last_index: -1, open: {}, models: {}, samples: [] };
}

/** Learn instance -> model and in-flight tasks from a state fetched with GET /state. */
export function seedMetrics(metrics: Metrics, state: State): Metrics {
  const models = { ...metrics.models };
  for (const inst of Object.values(state.instances)) models[inst.instance_id] = inst.model_id;
  const open = { ...metrics.open };
  for (const task of Object.values(state.tasks)) {
    open[task.task_id] ??= {
      instance_id: task.instance_id,
      created_at_ms: task.created_at_ms,
      ttft_ms: null,
    };
  }
  return { ...metrics, models, open };
}

export function observe(metrics: Metrics, indexed: IndexedEvent): Metrics {
  if (indexed.index <= metrics.last_index) return metrics;
  const next = { ...metrics, last_index: indexed.index };
  const event = indexed.event;
  switch (event.kind) {
    case 'instance_created': {
      const e = event as Extract<IndexedEvent['event'], { kind: 'instance_created' }>;
      return { ...next, models: { ...next.models, [e.instance.instance_id]: e.instance.model_id } };
    }
    case 'task_created': {
      const { task } = event as Extract<IndexedEvent['event'], { kind: 'task_created' }>;
      const open = {
        ...next.open,
        [task.task_id]: { instance_id: task.instance_id, created_at_ms: task.created_at_ms, ttft_ms: null },
      };
      return { ...next, open };
    }
    case 'task_first_token': {
      const e = event as Extract<IndexedEvent['event'], { kind: 'task_first_token' }>;
      const task = next.open[e.task_id];
      if (task === undefined) return next;
      return { ...next, open: { ...next.open, [e.task_id]: { ...task, ttft_ms: e.time_to_first_token_ms } } };
    }
    case 'task_finished': {
      const e = event as Extract<IndexedEvent['event'], { kind: 'task_finished' }>;
      const task = next.open[e.task_id];
      const open = { ...next.open };
      delete open[e.task_id];
      if (task === undefined || e.completion_tokens === 0) return { ...next, open };
      const decode_ms = e.decode_tokens_per_s > 0 ? (e.completion_tokens / e.decode_tokens_per_s) * 1000 : 0;
      const sample: TaskSample = {
        task_id: e.task_id,
        instance_id: task.instance_id,
        model_id: next.models[task.instance_id] ?? null,
        index: indexed.index,
        at_ms: task.created_at_ms + (task.ttft_ms ?? 0) + decode_ms,
        ttft_ms: task.ttft_ms,
        tokens_per_s: e.decode_tokens_per_s,
        completion_tokens: e.completion_tokens,
        finish_reason: e.finish_reason,
      };
      return { ...next, open, samples: [...next.samples, sample].slice(-MAX_SAMPLES) };
    }
    case 'task_failed':
    case 'task_cancelled': {
      // A cancelled task may still report what it generated (task_finished follows): keep
      // it open, but bounded, since a failed one never finishes.
      const ids = Object.keys(next.open);
      if (ids.length <= MAX_OPEN) return next;
      const open = { ...next.open };
      for (const id of ids.slice(0, ids.length - MAX_OPEN)) delete open[id];
      return { ...next, open };
    }
    default:
      return next;
  }
}

export interface InstanceStats {
  tasks: number;
  last_tokens_per_s: number | null;
  mean_tokens_per_s: number | null;
  last_ttft_ms: number | null;
}

/** Measured figures of one instance over its recent tasks. */
export function instanceStats(metrics: Metrics, instanceId: InstanceId, recent = 10): InstanceStats {
  const mine = metrics.samples.filter((s) => s.instance_id === instanceId);
  const last = mine.at(-1);
  const window = mine.slice(-recent);
  const mean =
    window.length === 0 ? null : window.reduce((sum, s) => sum + s.tokens_per_s, 0) / window.length;
  return {
    tasks: mine.length,
    last_tokens_per_s: last?.tokens_per_s ?? null,
    mean_tokens_per_s: mean,
    last_ttft_ms: last?.ttft_ms ?? null,
  };
}
