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

/** One stage's predicted share of a token, in seconds (instances.StagePrediction). */
export interface StagePrediction {
  device_id: string;
  decode_s: number;
  prefill_s: number;
  handoff_s: number;
}

/** What placement predicted for an instance (instances.InstancePrediction). */
export interface InstancePrediction {
  objective: 'latency' | 'throughput';
  solver_status: string;
  solve_time_s: number;
  tokens_per_s: number;
  time_per_token_s: number;
  throughput_tokens_per_s: number;
  ttft_s: number;
  reference_prompt_tokens: number;
  context_length: number;
  stages: StagePrediction[];
}

/** Decode tokens/s its finished tasks reported, folded by apply (instances.InstanceMeasured). */
export interface InstanceMeasured {
  measured_tasks: number;
  last_decode_tokens_per_s: number;
  recent_decode_tokens_per_s: number[];
  mean_decode_tokens_per_s: number;
}

/** How many finished tasks the measured figures average over (instances.MEASURED_WINDOW). */
export const MEASURED_WINDOW = 10;

export interface Instance {
  instance_id: InstanceId;
  model_id: ModelId;
  shards: ShardAssignment[];
  failed_reason: string | null;
  created_at_ms: number;
  // Absent from daemons older than the solver placement; null when not predicted/measured.
  prediction?: InstancePrediction | null;
  measured?: InstanceMeasured | null;
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
  // A chat (messages) or a text completion (prompt, messages empty).
  params: { messages: ChatMessage[]; prompt?: string | null; sampling: Record<string, unknown> };
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

/** What placement and the API know of a model (exo.shared.types.models.ModelCard). */
export interface ModelCard {
  model_id: ModelId;
  display_name: string;
  architecture: string;
  n_layers: number;
  hidden_size: number;
  vocab_size: number;
  context_length: number;
  dtype: string;
  bytes_per_layer: number;
  bytes_non_layer: number;
  kv_bytes_per_token_per_layer: number;
  kv_dtype: string;
  source: string;
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
  // Models added from the hub (absent from older daemons).
  models?: Record<ModelId, ModelCard>;
  // Hub models taken out of the catalogue: id -> the source it had.
  removed_models?: Record<ModelId, string>;
  origin_seqs: Record<string, number>;
  counters: TaskCounters;
  // Telemetry (absent from daemons without it).
  node_devices?: Record<NodeId, NodeDevices>;
  links?: Record<NodeId, Record<NodeId, LinkProfile>>;
  // The master of `term` (from its master_elected entry); absent from older daemons.
  master?: NodeId | null;
  runner_endpoints?: Record<RunnerId, RunnerEndpoint>;
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
  | { kind: 'model_added'; card: ModelCard }
  | { kind: 'model_removed'; model_id: ModelId }
  | ModelStoreProgress
  | { kind: 'model_files_removed'; node_id: NodeId; model_id: ModelId }
  | { kind: 'device_inventory_reported'; node_id: NodeId; devices: DeviceSpec[]; reported_at_ms: number }
  | {
      kind: 'device_metrics_reported';
      node_id: NodeId;
      metrics: Record<string, DeviceMetrics>;
      reported_at_ms: number;
    }
  | { kind: 'link_profile_measured'; source: NodeId; target: NodeId; profile: LinkProfile }
  | { kind: 'runner_endpoint_reported'; runner_id: RunnerId; endpoint: RunnerEndpoint }
  // The cluster's own events (membership, election, command outcomes).
  | { kind: 'member_joined'; node_id: NodeId }
  | { kind: 'member_left'; node_id: NodeId }
  | { kind: 'member_timed_out'; node_id: NodeId; silent_ms: number }
  | { kind: 'master_elected'; node_id: NodeId; term: number }
  | { kind: 'command_decided'; node_id: NodeId; reply: unknown };

/** Where a pipeline stage's runner listens (its neighbours connect there). */
export interface RunnerEndpoint {
  node_id: NodeId;
  host: string;
  port: number;
}

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
  'model_added',
  'model_removed',
  'model_store_progress',
  'model_files_removed',
  'device_inventory_reported',
  'device_metrics_reported',
  'link_profile_measured',
  'runner_endpoint_reported',
  'member_joined',
  'member_left',
  'member_timed_out',
  'master_elected',
  'command_decided',
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
