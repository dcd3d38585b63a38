import { describe, expect, it } from 'vitest';
import { apply, ApplyError, fold, UnknownEventError } from '../lib/apply';
import { emptyState, MEASURED_WINDOW, type IndexedEvent, type State, type Task } from '../lib/types';
import { deepFreeze, recordedEvents, recordedState, synthetic } from './fixtures';

// A daemon without telemetry has no node_devices/links; one with it starts them empty.
// Fields of newer daemons this fold has no event for yet start at their defaults.
function withTelemetry(state: State): State {
  return {
    node_devices: {},
    links: {},
    master: null,
    runner_endpoints: {},
    models: {},
    removed_models: {},
    ...state,
  };
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

  it('adds a model from the hub to the catalogue', () => {
    const state = fold(emptyState(), events);
    expect(Object.keys(state.models ?? {})).toEqual(['org/chat']);
    expect(state.models?.['org/chat']?.source).toMatch(/^hf:org\/chat@/);
    expect(state.removed_models).toEqual({ 'org/old': `hf:org/old@${'b'.repeat(40)}` });
  });

  it("forgets a node's copy of a model once it removed the files", () => {
    const state = fold(emptyState(), events);
    // B's copy of org/chat went to make room; A's stays, and an unknown one changes nothing.
    expect(Object.keys(state.model_progress)).toEqual(['node-aaaa/smollm2-135m-instruct', 'node-aaaa/org/chat']);
    const before = fold(emptyState(), events.slice(0, -1));
    expect(apply(before, events[events.length - 1]!).model_progress).toBe(before.model_progress);
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

  it('keeps the placement prediction and folds measured tokens/s per instance', () => {
    const state = fold(emptyState(), events);
    const inst = state.instances['inst-2'];
    expect(inst?.prediction?.tokens_per_s).toBe(50);
    // t5 (5 tokens at 25) and t6 (40 at 31.3) count; t7 (one token) has no decode rate.
    expect(inst?.measured).toEqual({
      measured_tasks: 2,
      last_decode_tokens_per_s: 31.3,
      recent_decode_tokens_per_s: [25, 31.3],
      mean_decode_tokens_per_s: (25 + 31.3) / 2,
    });
    // An instance created by an older daemon carries neither: both read as null.
    expect(fold(emptyState(), events.slice(0, 3)).instances['inst-1']?.measured).toBeNull();
  });

  it('keeps only the last MEASURED_WINDOW rates', () => {
    let state = fold(emptyState(), events);
    let index = state.last_index;
    for (let i = 0; i < MEASURED_WINDOW + 2; i++) {
      const task_id = `w${i}`;
      const task: Task = { ...(recordedTask(events) as Task), task_id, instance_id: 'inst-2' };
      state = apply(state, { index: ++index, term: 2, origin: 'm', origin_seq: 100 + 2 * i, event: { kind: 'task_created', task } });
      state = apply(state, {
        index: ++index,
        term: 2,
        origin: 'm',
        origin_seq: 101 + 2 * i,
        event: { kind: 'task_finished', task_id, finish_reason: 'stop', prompt_tokens: 1, completion_tokens: 9, decode_tokens_per_s: i + 1 },
      });
    }
    const measured = state.instances['inst-2']?.measured;
    expect(measured?.measured_tasks).toBe(2 + MEASURED_WINDOW + 2);
    expect(measured?.recent_decode_tokens_per_s).toEqual([3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    expect(measured?.mean_decode_tokens_per_s).toBe(7.5);
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

function recordedTask(events: IndexedEvent[]): Task | undefined {
  for (const e of events) if (e.event.kind === 'task_created') return e.event.task as Task;
  return undefined;
}
