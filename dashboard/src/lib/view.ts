// Derived views of the state, pure (ports of exo.api.generation.view_instance & co).

import type { Instance, NodeInfo, RunnerStatus, ShardAssignment, State, Task } from './types';

export type InstanceStatus = 'loading' | 'serving' | 'failed';

export interface InstanceView {
  instance: Instance;
  status: InstanceStatus;
  progress: number;
  failed_reason: string | null;
  runners: { shard: ShardAssignment; status: RunnerStatus | null }[];
  tasks: Task[];
}

export function runnerProgress(status: RunnerStatus | null): number {
  if (status === null) return 0;
  if (status.kind === 'loading') return status.progress;
  if (status.kind === 'ready' || status.kind === 'running' || status.kind === 'warming_up') return 1;
  return 0;
}

export function viewInstance(state: State, instance: Instance): InstanceView {
  const runners = instance.shards.map((shard) => ({
    shard,
    status: state.runners[shard.runner_id] ?? null,
  }));
  let failed = instance.failed_reason;
  if (failed === null) {
    for (const { status } of runners) {
      if (status?.kind === 'failed') {
        failed = status.reason;
        break;
      }
      if (status?.kind === 'stopped') {
        failed = 'a runner of this instance stopped';
        break;
      }
    }
  }
  let status: InstanceStatus;
  let progress: number;
  if (failed !== null) {
    status = 'failed';
    progress = 0;
  } else if (runners.every((r) => r.status?.kind === 'ready' || r.status?.kind === 'running')) {
    status = 'serving';
    progress = 1;
  } else {
    status = 'loading';
    progress = runners.reduce((sum, r) => sum + runnerProgress(r.status), 0) / runners.length;
  }
  const tasks = Object.values(state.tasks)
    .filter((t) => t.instance_id === instance.instance_id)
    .sort((a, b) => a.created_at_ms - b.created_at_ms);
  return { instance, status, progress, failed_reason: failed, runners, tasks };
}

export function instanceViews(state: State): InstanceView[] {
  return Object.values(state.instances)
    .sort((a, b) => a.created_at_ms - b.created_at_ms)
    .map((i) => viewInstance(state, i));
}

/** One segment of a layer bar: [start, end) of n layers as percentages of the bar. */
export interface LayerSegment {
  shard: ShardAssignment;
  left_pct: number;
  width_pct: number;
  label: string;
}

export function layerSegments(shards: readonly ShardAssignment[]): LayerSegment[] {
  return shards.map((shard) => {
    const n = Math.max(1, shard.n_layers);
    return {
      shard,
      left_pct: (100 * shard.start_layer) / n,
      width_pct: (100 * (shard.end_layer - shard.start_layer)) / n,
      label: `layers ${shard.start_layer}–${shard.end_layer - 1} of ${shard.n_layers}`,
    };
  });
}

/** A stable colour per key (node or device), from a small accessible palette. */
const PALETTE = ['#4f9dff', '#3ecf8e', '#f5a524', '#c084fc', '#f87171', '#22d3ee', '#a3e635', '#fb923c'];
export function colourFor(key: string): string {
  let h = 0;
  for (const ch of key) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return PALETTE[h % PALETTE.length] ?? '#4f9dff';
}

export function nodeLabel(node: NodeInfo | undefined, nodeId: string): string {
  return node ? `${node.hostname} (${shortId(nodeId)})` : shortId(nodeId);
}

export function shortId(id: string): string {
  const dash = id.indexOf('-');
  const rest = dash >= 0 ? id.slice(dash + 1) : id;
  return `${dash >= 0 ? id.slice(0, dash + 1) : ''}${rest.slice(0, 6)}`;
}

export function runnerLabel(status: RunnerStatus | null): string {
  if (status === null) return 'unknown';
  switch (status.kind) {
    case 'loading':
      return `loading ${Math.round(status.progress * 100)}%`;
    case 'warming_up':
      return 'warming up';
    case 'failed':
      return 'failed';
    default:
      return status.kind;
  }
}

export function formatBytes(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(u === 0 || v >= 100 ? 0 : 1)} ${units[u]}`;
}

export function formatNumber(n: number, digits = 1): string {
  if (!Number.isFinite(n)) return String(n);
  if (Math.abs(n) >= 1000 || Number.isInteger(n)) return Math.round(n).toLocaleString('en');
  return n.toFixed(digits);
}
