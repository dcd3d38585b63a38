// The shapes of exo's control plane, mirrored from src/exo/shared/types/*.py.
// Telemetry shapes live in telemetry.ts. Only what the dashboard reads is typed strictly; unknown extra fields (telemetry,
// placement details from later versions of the daemon) are carried through untouched.

import type { DeviceMetrics, DeviceSpec, LinkProfile, NodeDevices } from './telemetry';

export type NodeId = string;
export type InstanceId = string;
export type RunnerId = string;
export type TaskId = string;
export type ModelId = string;

export interface NodeInfo {
  node_id: NodeId;
  session: string;
  hostname: string;
  api_port: number;
  started_at_ms: number;
  status: 'up' | 'down';
  [extra: string]: unknown;
}

export interface ShardAssignment {
  runner_id: RunnerId;
  node_id: NodeId;
  device: string;
  engine: string;
  start_layer: number;
  end_layer: number;
  n_layers: number;
  [extra: string]: unknown;
}

export interface Instance {
  instance_id: InstanceId;
  model_id: ModelId;
  shards: ShardAssignment[];
  failed_reason: string | null;
  created_at_ms: number;
  [extra: string]: unknown;
}

export type RunnerStatus =
  | { kind: 'spawning' }
  | { kind: 'loading'; progress: number }
  | { kind: 'warming_up' }
  | { kind: 'ready' }
  | { kind: 'running' }
  | { kind: 'failed'; reason: string }
  | { kind: 'stopped' };

export interface ChatMessage {
  role: 'system' | 'user' | 'assistant' | 'tool';
  content: string;
}

export interface Task {
  task_id: TaskId;
  instance_id: InstanceId;
  owner: NodeId;
  params: { messages: ChatMessage[]; sampling: Record<string, unknown> };
  status: 'pending' | 'running';
  created_at_ms: number;
}

export interface ModelStoreProgress {
  kind: 'model_store_progress';
  node_id: NodeId;
  model_id: ModelId;
  done_bytes: number;
  total_bytes: number;
  complete: boolean;
}

export interface TaskCounters {
  finished: number;
  failed: number;
  completion_tokens: number;
}

export interface State {
  last_index: number;
  term: number;
  nodes: Record<NodeId, NodeInfo>;
  instances: Record<InstanceId, Instance>;
  runners: Record<RunnerId, RunnerStatus>;
  tasks: Record<TaskId, Task>;
  model_progress: Record<string, ModelStoreProgress>;
  origin_seqs: Record<string, number>;
  counters: TaskCounters;
  // Telemetry (absent from daemons without it).
  node_devices?: Record<NodeId, NodeDevices>;
  links?: Record<NodeId, Record<NodeId, LinkProfile>>;
  // Fields added by later daemons (devices, links, ...): shown when present.
  [extra: string]: unknown;
}

export type Event =
  | {
      kind: 'node_started';
      node_id: NodeId;
      session: string;
      hostname: string;
      api_port: number;
      started_at_ms: number;
    }
  | { kind: 'instance_created'; instance: Instance }
  | { kind: 'instance_deleted'; instance_id: InstanceId; reason: string }
  | { kind: 'runner_status_changed'; runner_id: RunnerId; status: RunnerStatus }
  | { kind: 'task_created'; task: Task }
  | { kind: 'task_started'; task_id: TaskId }
  | { kind: 'task_first_token'; task_id: TaskId; time_to_first_token_ms: number }
  | {
      kind: 'task_finished';
      task_id: TaskId;
      finish_reason: 'stop' | 'length' | 'cancelled' | 'error';
      prompt_tokens: number;
      completion_tokens: number;
      decode_tokens_per_s: number;
    }
  | { kind: 'task_failed'; task_id: TaskId; reason: string }
  | { kind: 'task_cancelled'; task_id: TaskId; reason: string }
  | ModelStoreProgress
  | { kind: 'device_inventory_reported'; node_id: NodeId; devices: DeviceSpec[]; reported_at_ms: number }
  | {
      kind: 'device_metrics_reported';
      node_id: NodeId;
      metrics: Record<string, DeviceMetrics>;
      reported_at_ms: number;
    }
  | { kind: 'link_profile_measured'; source: NodeId; target: NodeId; profile: LinkProfile };

export const KNOWN_EVENT_KINDS: ReadonlySet<string> = new Set([
  'node_started',
  'instance_created',
  'instance_deleted',
  'runner_status_changed',
  'task_created',
  'task_started',
  'task_first_token',
  'task_finished',
  'task_failed',
  'task_cancelled',
  'model_store_progress',
  'device_inventory_reported',
  'device_metrics_reported',
  'link_profile_measured',
]);

/** An event of a kind this dashboard does not know (from a newer daemon). */
export interface UnknownEvent {
  kind: string;
  [field: string]: unknown;
}

export interface IndexedEvent {
  index: number;
  term: number;
  origin: string;
  origin_seq: number;
  event: Event | UnknownEvent;
}

export interface StateResponse {
  node_id: NodeId;
  last_index: number;
  state_hash: string;
  state: State;
}

export interface ModelInfo {
  id: ModelId;
  display_name?: string;
  context_length?: number;
  n_layers?: number;
  dtype?: string;
  [extra: string]: unknown;
}

export function isKnownEvent(event: Event | UnknownEvent): event is Event {
  return KNOWN_EVENT_KINDS.has(event.kind);
}

export function emptyState(): State {
  return {
    last_index: -1,
    term: 0,
    nodes: {},
    instances: {},
    runners: {},
    tasks: {},
    model_progress: {},
    origin_seqs: {},
    counters: { finished: 0, failed: 0, completion_tokens: 0 },
  };
}
