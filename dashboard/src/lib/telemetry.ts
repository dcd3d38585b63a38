// Devices and links (src/exo/shared/types/telemetry.py), shown only when the daemon's
// state carries them: a daemon without telemetry has no `node_devices`/`links`, and the
// dashboard then shows no device cards and no link labels. Nothing here invents a figure.

import type { InstanceStats } from './metrics';
import type { Instance, InstanceMeasured, InstancePrediction, NodeId, State } from './types';

export interface PerfFigure {
  value: number;
  source: 'spec_table' | 'measured' | 'unknown';
  detail: string;
}

export interface DeviceSpec {
  device_id: string;
  kind: 'cpu' | 'cuda' | 'metal' | string;
  name: string;
  index: number;
  uuid?: string | null;
  memory_total_bytes: number;
  memory_pool?: string;
  memory_bandwidth?: PerfFigure;
  compute?: PerfFigure;
  cores?: number | null;
  // CPUs: the variant of exo's quantized CPU kernels this CPU runs.
  cpu_kernels?: 'avx512-vnni' | 'avx2' | 'none' | null;
  compute_capability?: string | null;
  power_limit_w?: number | null;
  [extra: string]: unknown;
}

export interface DeviceMetrics {
  status: 'ok' | 'error' | 'lost' | string;
  status_detail?: string | null;
  memory_used_bytes: number;
  memory_free_bytes: number;
  utilization_pct?: number | null;
  temperature_c?: number | null;
  power_w?: number | null;
  sm_clock_mhz?: number | null;
  [extra: string]: unknown;
}

export interface NodeDevices {
  devices: DeviceSpec[];
  metrics: Record<string, DeviceMetrics>;
  inventory_at_ms: number;
  metrics_at_ms: number;
}

export interface LinkProfile {
  rtt_ms: number;
  rtt_min_ms?: number;
  bandwidth_bytes_per_s: number;
  ping_samples?: number;
  bulk_bytes?: number;
  measured_at_ms: number;
}

function isObj(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

export function hasTelemetry(state: State): boolean {
  return isObj(state.node_devices) || isObj(state.links);
}

export function nodeDevices(state: State): Record<NodeId, NodeDevices> {
  return isObj(state.node_devices) ? (state.node_devices as Record<NodeId, NodeDevices>) : {};
}

export interface DeviceView {
  key: string;
  node_id: NodeId;
  spec: DeviceSpec;
  metrics: DeviceMetrics | null;
  /** Used and total bytes, when the device reported its memory. */
  memory: { used: number; total: number } | null;
}

export function deviceViews(state: State, nodeId?: NodeId): DeviceView[] {
  const out: DeviceView[] = [];
  for (const [node, nd] of Object.entries(nodeDevices(state))) {
    if (nodeId !== undefined && node !== nodeId) continue;
    for (const spec of Array.isArray(nd.devices) ? nd.devices : []) {
      const metrics = (isObj(nd.metrics) ? nd.metrics[spec.device_id] : undefined) ?? null;
      let memory: DeviceView['memory'] = null;
      if (metrics !== null && spec.memory_total_bytes > 0) {
        const used =
          metrics.memory_used_bytes > 0
            ? metrics.memory_used_bytes
            : Math.max(0, spec.memory_total_bytes - metrics.memory_free_bytes);
        memory = { used, total: spec.memory_total_bytes };
      }
      out.push({ key: `${node}/${spec.device_id}`, node_id: node, spec, metrics, memory });
    }
  }
  return out;
}

export interface LinkView {
  key: string;
  source: NodeId;
  target: NodeId;
  profile: LinkProfile;
}

export function linkViews(state: State): LinkView[] {
  const out: LinkView[] = [];
  if (!isObj(state.links)) return out;
  for (const [source, targets] of Object.entries(state.links)) {
    if (!isObj(targets)) continue;
    for (const [target, profile] of Object.entries(targets)) {
      if (isObj(profile) && typeof profile.rtt_ms === 'number') {
        out.push({ key: `${source}->${target}`, source, target, profile: profile as unknown as LinkProfile });
      }
    }
  }
  return out;
}

/** One undirected edge per node pair, with the figures of each direction measured. */
export interface Edge {
  key: string;
  a: NodeId;
  b: NodeId;
  ab: LinkProfile | null;
  ba: LinkProfile | null;
}

export function edges(state: State): Edge[] {
  const byPair = new Map<string, Edge>();
  for (const link of linkViews(state)) {
    const [a, b] = [link.source, link.target].sort() as [NodeId, NodeId];
    const key = `${a}|${b}`;
    const edge = byPair.get(key) ?? { key, a, b, ab: null, ba: null };
    if (link.source === a) edge.ab = link.profile;
    else edge.ba = link.profile;
    byPair.set(key, edge);
  }
  return [...byPair.values()];
}

export function formatRate(bytesPerS: number): string {
  const bits = bytesPerS * 8;
  if (bits >= 1e9) return `${(bits / 1e9).toFixed(bits >= 1e10 ? 0 : 1)} Gbit/s`;
  if (bits >= 1e6) return `${(bits / 1e6).toFixed(bits >= 1e7 ? 0 : 1)} Mbit/s`;
  return `${(bits / 1e3).toFixed(0)} kbit/s`;
}

export function formatFlops(flops: number): string {
  if (flops >= 1e12) return `${(flops / 1e12).toFixed(1)} TFLOPS`;
  return `${(flops / 1e9).toFixed(0)} GFLOPS`;
}

/** A device's live figures as time series for its charts (bounded ring per device). */
export interface DeviceSeries {
  t: number[];
  utilization_pct: (number | null)[];
  temperature_c: (number | null)[];
  power_w: (number | null)[];
  memory_used_pct: (number | null)[];
}

export const SERIES_POINTS = 120;

export function recordDeviceSeries(
  history: Record<string, DeviceSeries>,
  state: State,
): Record<string, DeviceSeries> {
  let changed = false;
  const next = { ...history };
  for (const [node, nd] of Object.entries(nodeDevices(state))) {
    const at = nd.metrics_at_ms / 1000;
    for (const view of deviceViews(state, node)) {
      if (view.metrics === null) continue;
      const old = next[view.key];
      if (old !== undefined && old.t.at(-1) === at) continue;
      const m = view.metrics;
      const push = <T>(xs: T[] | undefined, x: T): T[] => [...(xs ?? []), x].slice(-SERIES_POINTS);
      next[view.key] = {
        t: push(old?.t, at),
        utilization_pct: push(old?.utilization_pct, m.utilization_pct ?? null),
        temperature_c: push(old?.temperature_c, m.temperature_c ?? null),
        power_w: push(old?.power_w, m.power_w ?? null),
        memory_used_pct: push(
          old?.memory_used_pct,
          view.memory ? (100 * view.memory.used) / view.memory.total : null,
        ),
      };
      changed = true;
    }
  }
  return changed ? next : history;
}

/** A predicted tokens/s the instance carries (from its placement), when it carries one. */
export function predictedTokensPerS(instance: Record<string, unknown>): number | null {
  for (const holder of [instance, instance.placement]) {
    if (!isObj(holder)) continue;
    const prediction = holder.prediction;
    if (isObj(prediction) && typeof prediction.tokens_per_s === 'number') return prediction.tokens_per_s;
    if (typeof holder.predicted_tokens_per_s === 'number') return holder.predicted_tokens_per_s;
  }
  return null;
}

function linkText(p: LinkProfile): string {
  return `${p.rtt_ms.toFixed(p.rtt_ms < 10 ? 2 : 0)} ms · ${formatRate(p.bandwidth_bytes_per_s)}`;
}

/** The edge's label: RTT and bandwidth of a -> b (or of b -> a when only that was measured). */
export function edgeLabel(e: Edge): string {
  const p = e.ab ?? e.ba;
  return p === null ? '' : linkText(p);
}

/** Both directions, for the edge's tooltip. */
export function edgeTitle(e: Edge, name: (id: NodeId) => string = (id) => id): string {
  const parts: string[] = [];
  if (e.ab) parts.push(`${name(e.a)} → ${name(e.b)}: ${linkText(e.ab)}`);
  if (e.ba) parts.push(`${name(e.b)} → ${name(e.a)}: ${linkText(e.ba)}`);
  return parts.join('\n');
}

/** Predicted (placement) against measured (finished tasks) figures of one instance. */
export interface PerfComparison {
  predicted_tokens_per_s: number | null;
  predicted_ttft_ms: number | null;
  // The objective and solver status that produced the prediction, and its TTFT.
  solver: string | null;
  measured_last: number | null;
  measured_mean: number | null;
  measured_tasks: number;
  // Measured mean over predicted: 1 when the cost model is exact.
  ratio: number | null;
  // Predicted decode ms per token of each stage, in pipeline order (null: not predicted).
  stage_ms: (number | null)[];
}

/** The state's own fold (`instance.measured`) when present, else the event log's samples. */
export function comparePerf(instance: Instance, stats: InstanceStats): PerfComparison {
  const prediction = isObj(instance.prediction) ? (instance.prediction as InstancePrediction) : null;
  const measured = isObj(instance.measured) ? (instance.measured as InstanceMeasured) : null;
  const predicted = prediction?.tokens_per_s ?? predictedTokensPerS(instance);
  const last = measured?.last_decode_tokens_per_s ?? stats.last_tokens_per_s;
  const mean = measured?.mean_decode_tokens_per_s ?? stats.mean_tokens_per_s;
  const stages = prediction?.stages ?? [];
  return {
    predicted_tokens_per_s: predicted,
    predicted_ttft_ms: prediction ? prediction.ttft_s * 1000 : null,
    solver: prediction
      ? `${prediction.objective}, ${prediction.solver_status}; TTFT for a ${prediction.reference_prompt_tokens}-token prompt ${(prediction.ttft_s * 1000).toFixed(0)} ms`
      : null,
    measured_last: last,
    measured_mean: mean,
    measured_tasks: measured?.measured_tasks ?? stats.tasks,
    ratio: predicted !== null && predicted > 0 && mean !== null ? mean / predicted : null,
    stage_ms: instance.shards.map((_, i) => {
      const stage = stages.length === instance.shards.length ? stages[i] : undefined;
      return stage === undefined ? null : stage.decode_s * 1000;
    }),
  };
}
