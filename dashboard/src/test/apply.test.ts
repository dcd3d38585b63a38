import { describe, expect, it } from 'vitest';
import { apply, ApplyError, fold, UnknownEventError } from '../lib/apply';
import { emptyState, type IndexedEvent, type State } from '../lib/types';
import { deepFreeze, recordedEvents, recordedState, synthetic } from './fixtures';

// A daemon without telemetry has no node_devices/links; one with it starts them empty.
function withTelemetry(state: State): State {
  return { node_devices: {}, links: {}, ...state };
}

describe('apply over events recorded from a real daemon', () => {
  const events = recordedEvents();

  it.each([34, 36, 74] as const)('folding 0..%i from empty gives GET /state', (index) => {
    const expected = recordedState(index);
    const state = fold(emptyState(), events.slice(0, index + 1));
    expect(withTelemetry(state)).toEqual(withTelemetry(expected.state));
    expect(state.last_index).toBe(expected.last_index);
  });

  it('continues from a fetched /state like the live dashboard does', () => {
    const snapshot = recordedState(34).state;
    expect(withTelemetry(fold(snapshot, events.slice(35)))).toEqual(withTelemetry(recordedState(74).state));
  });

  it('never mutates its input', () => {
    let state: State = deepFreeze(emptyState());
    for (const e of events) state = deepFreeze(apply(state, deepFreeze(e)));
    expect(state.last_index).toBe(74);
  });
});

describe('apply matches exo.shared.apply on failure paths', () => {
  const { events, state: expected } = synthetic();

  it('gives the state Python computed', () => {
    expect(withTelemetry(fold(emptyState(), events))).toEqual(withTelemetry(expected));
  });

  it('folds device inventory, metrics and links', () => {
    const state = fold(emptyState(), events);
    // Metrics before an inventory are dropped; a device leaving takes its figures along.
    expect(Object.keys(state.node_devices ?? {})).toEqual(['node-aaaa']);
    expect(Object.keys(state.node_devices?.['node-aaaa']?.metrics ?? {})).toEqual(['cpu']);
    expect(state.links?.['node-aaaa']?.['node-bbbb']?.rtt_ms).toBe(0.4);
    expect(state.links?.['node-bbbb']?.['node-aaaa']?.bandwidth_bytes_per_s).toBe(1.1e9);
  });

  it('marks an instance failed with its runner reason and fails its tasks', () => {
    const state = fold(emptyState(), events.slice(0, 11));
    expect(state.instances['inst-1']?.failed_reason).toBe('out of memory on cuda:0');
    expect(state.tasks).toEqual({});
    expect(state.counters.failed).toBe(2);
  });

  it('fails the tasks a restarted node owned', () => {
    const before = fold(emptyState(), events.slice(0, 14));
    expect(Object.keys(before.tasks)).toEqual(['t3']);
    const after = apply(before, events[14] as IndexedEvent);
    expect(after.tasks).toEqual({});
    expect(after.nodes['node-bbbb']?.session).toBe('2');
  });

  it('ignores a runner report after its instance was deleted', () => {
    const deleted = fold(emptyState(), events.slice(0, 20));
    const late = apply(deleted, events[20] as IndexedEvent);
    expect(late.runners).toEqual(deleted.runners);
    expect(late.last_index).toBe(20);
  });
});

describe('apply refuses what cannot follow', () => {
  const events = recordedEvents();
  const state = fold(emptyState(), events.slice(0, 5));

  it('an index gap', () => {
    expect(() => apply(state, events[6] as IndexedEvent)).toThrow(ApplyError);
  });

  it('a replayed index', () => {
    expect(() => apply(state, events[4] as IndexedEvent)).toThrow(ApplyError);
  });

  it('a stale term', () => {
    const next = { ...(events[5] as IndexedEvent), term: 0 };
    expect(() => apply(state, next)).toThrow(ApplyError);
  });

  it('an event kind from a newer daemon', () => {
    const unknown: IndexedEvent = {
      index: 5,
      term: 1,
      origin: 'x',
      origin_seq: 0,
      event: { kind: 'device_metrics', node_id: 'n' },
    };
    expect(() => apply(state, unknown)).toThrow(UnknownEventError);
  });
});
