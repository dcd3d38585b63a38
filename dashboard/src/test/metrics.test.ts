import { describe, expect, it } from 'vitest';
import { emptyMetrics, instanceStats, observe, seedMetrics } from '../lib/metrics';
import { recordedEvents, recordedState, synthetic } from './fixtures';

describe('metrics', () => {
  it('keeps measured tokens/s and time to first token of finished tasks', () => {
    const m = recordedEvents().reduce(observe, emptyMetrics());
    expect(m.samples).toHaveLength(4);
    const [first] = m.samples;
    expect(first?.model_id).toBe('smollm2-135m-instruct');
    expect(first?.completion_tokens).toBe(16);
    expect(first?.tokens_per_s).toBeCloseTo(6.894, 2);
    expect(first?.ttft_ms).toBeCloseTo(3207.5, 0);
    expect(first?.finish_reason).toBe('stop');
    expect(m.samples.map((s) => s.finish_reason)).toEqual(['stop', 'length', 'cancelled', 'cancelled']);
    expect(m.open).toEqual({});
    const stats = instanceStats(m, 'inst-da571f4d7248');
    expect(stats.tasks).toBe(2);
    expect(stats.mean_tokens_per_s).toBeCloseTo((6.894278396856594 + 5.945528457823403) / 2, 6);
  });

  it('counts each event once', () => {
    const events = recordedEvents();
    let m = events.reduce(observe, emptyMetrics());
    m = events.reduce(observe, m);
    expect(m.samples).toHaveLength(4);
  });

  it('learns in-flight tasks from a fetched state', () => {
    const { events } = synthetic();
    const state = recordedState(74).state;
    const seeded = seedMetrics(emptyMetrics(), state);
    expect(Object.keys(seeded.models)).toEqual(['inst-39ed91dee220']);
    expect(observe(seeded, events[0]!).last_index).toBe(0);
  });

  it('records only finished tasks that generated tokens', () => {
    const { events } = synthetic();
    const m = events.reduce(observe, emptyMetrics());
    expect(m.samples.map((s) => s.task_id)).toEqual(['t5', 't7', 't6']);
    expect(m.samples[0]?.at_ms).toBeCloseTo(5000 + 120.5 + 200, 6);
    expect(Object.keys(m.open).sort()).toEqual(['t1', 't2', 't3', 't4']);
    expect(instanceStats(m, 'inst-2').last_ttft_ms).toBe(95);
  });
});
