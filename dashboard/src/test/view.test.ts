import { describe, expect, it } from 'vitest';
import { fold } from '../lib/apply';
import { deviceViews, edges, formatRate, predictedTokensPerS, recordDeviceSeries } from '../lib/telemetry';
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

  it('find a predicted tokens/s only where the instance carries one', () => {
    expect(predictedTokensPerS({ instance_id: 'i' })).toBeNull();
    expect(predictedTokensPerS({ placement: { prediction: { tokens_per_s: 42 } } })).toBe(42);
  });
});
