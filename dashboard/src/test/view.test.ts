import { describe, expect, it } from 'vitest';
import { fold } from '../lib/apply';
import {
  comparePerf,
  deviceViews,
  edgeLabel,
  edges,
  edgeTitle,
  formatRate,
  predictedTokensPerS,
  recordDeviceSeries,
} from '../lib/telemetry';
import { emptyState } from '../lib/types';
import { instanceViews, layerSegments, runnerLabel, viewInstance } from '../lib/view';
import { recordedEvents, synthetic } from './fixtures';

describe('instance views', () => {
  const events = recordedEvents();

  it('follow a real instance from spawning through loading to serving', () => {
    const at = (i: number) => instanceViews(fold(emptyState(), events.slice(0, i + 1)))[0];
    expect(at(1)?.status).toBe('loading');
    expect(at(1)?.progress).toBe(0);
    expect(at(16)?.progress).toBe(0.5);
    expect(runnerLabel(at(16)?.runners[0]?.status ?? null)).toBe('loading 50%');
    expect(at(22)?.status).toBe('serving');
    expect(at(23)?.tasks).toHaveLength(1);
    expect(at(35)).toBeUndefined();
  });

  it('show a failed runner reason', () => {
    const { events: synth } = synthetic();
    const state = fold(emptyState(), synth.slice(0, 11));
    const view = viewInstance(state, state.instances['inst-1']!);
    expect(view.status).toBe('failed');
    expect(view.failed_reason).toBe('out of memory on cuda:0');
  });

  it('draw layer ranges as segments of the model', () => {
    const { events: synth } = synthetic();
    const state = fold(emptyState(), synth.slice(0, 3));
    const segments = layerSegments(state.instances['inst-1']!.shards);
    expect(segments.map((s) => [s.left_pct, s.width_pct])).toEqual([
      [0, 50],
      [50, 50],
    ]);
    expect(segments[1]?.label).toBe('layers 15–29 of 30');
  });
});

describe('telemetry views', () => {
  const { events } = synthetic();

  it('are empty for a daemon without telemetry', () => {
    const state = fold(emptyState(), recordedEvents());
    expect(deviceViews(state)).toEqual([]);
    expect(edges(state)).toEqual([]);
  });

  it('show devices with their figures and memory', () => {
    const state = fold(emptyState(), events.slice(0, 27));
    const views = deviceViews(state);
    expect(views.map((v) => v.key)).toEqual(['node-aaaa/cpu', 'node-aaaa/cuda:0']);
    expect(views[0]?.memory).toEqual({ used: 4 * 2 ** 30, total: 16 * 2 ** 30 });
    expect(views[1]?.metrics?.power_w).toBe(70.5);
    const series = recordDeviceSeries({}, state);
    expect(series['node-aaaa/cpu']?.utilization_pct).toEqual([12.5]);
    expect(recordDeviceSeries(series, state)).toBe(series); // unchanged figures add no point
  });

  it('pair links into edges with both directions', () => {
    const state = fold(emptyState(), events);
    const [edge] = edges(state);
    expect(edge?.a).toBe('node-aaaa');
    expect(edge?.ab?.rtt_ms).toBe(0.4);
    expect(edge?.ba?.rtt_ms).toBe(0.5);
    expect(formatRate(1.2e9)).toBe('9.6 Gbit/s');
  });

  it('draw one edge per node pair however many links there are', () => {
    const link = (rtt_ms: number, bandwidth_bytes_per_s: number) => ({
      rtt_ms,
      rtt_min_ms: rtt_ms,
      bandwidth_bytes_per_s,
      ping_samples: 10,
      bulk_bytes: 1 << 20,
      measured_at_ms: 0,
    });
    const links = {
      a: { b: link(0.4, 1.25e9), c: link(12, 1.25e8) },
      b: { a: link(0.5, 1.1e9), c: link(0.3, 1.25e9) },
      c: { a: link(11, 1.2e8) },
    };
    const state = { ...emptyState(), links };
    const all = edges(state);
    expect(all.map((e) => e.key)).toEqual(['a|b', 'a|c', 'b|c']);
    const [ab, ac, bc] = all;
    expect(edgeLabel(ab!)).toBe('0.40 ms · 10 Gbit/s');
    expect(edgeLabel(ac!)).toBe('12 ms · 1.0 Gbit/s');
    expect(edgeTitle(ab!, (id) => id.toUpperCase())).toBe('A → B: 0.40 ms · 10 Gbit/s\nB → A: 0.50 ms · 8.8 Gbit/s');
    // Only the reverse direction measured: it labels the edge.
    expect(bc?.ab?.rtt_ms).toBe(0.3);
    expect(edgeTitle(bc!)).toBe('b → c: 0.30 ms · 10 Gbit/s');
    expect(edges({ ...emptyState(), links: {} })).toEqual([]);
  });

  it('compare predicted with measured tokens/s per instance', () => {
    const state = fold(emptyState(), events);
    const inst = state.instances['inst-2']!;
    const none = { tasks: 0, last_tokens_per_s: null, mean_tokens_per_s: null, last_ttft_ms: null };
    const perf = comparePerf(inst, none);
    expect(perf.predicted_tokens_per_s).toBe(50);
    expect(perf.measured_last).toBe(31.3);
    expect(perf.measured_mean).toBeCloseTo(28.15, 10);
    expect(perf.ratio).toBeCloseTo(28.15 / 50, 10);
    expect(perf.stage_ms).toEqual([20]);
    expect(perf.solver).toContain('latency, optimal');
    // No prediction and no measure in the state: the event log's samples, no ratio.
    const bare = { ...inst, prediction: null, measured: null };
    const fromLog = comparePerf(bare, { ...none, tasks: 1, last_tokens_per_s: 9, mean_tokens_per_s: 8 });
    expect([fromLog.predicted_tokens_per_s, fromLog.measured_mean, fromLog.ratio]).toEqual([null, 8, null]);
    expect(fromLog.stage_ms).toEqual([null]);
  });

  it('find a predicted tokens/s only where the instance carries one', () => {
    expect(predictedTokensPerS({ instance_id: 'i' })).toBeNull();
    expect(predictedTokensPerS({ placement: { prediction: { tokens_per_s: 42 } } })).toBe(42);
  });
});
