import { describe, expect, it } from 'vitest';
import { fold } from '../lib/apply';
import { type Snapshot, type StreamHandlers, Sync, type Transport } from '../lib/sync';
import { emptyState, type IndexedEvent, type StateResponse } from '../lib/types';
import { recordedEvents } from './fixtures';

const events = recordedEvents();

function stateAt(index: number): StateResponse {
  const state = fold(emptyState(), events.slice(0, index + 1));
  return { node_id: 'node-x', last_index: state.last_index, state_hash: '', state };
}

class FakeTransport implements Transport {
  stateAt = 10;
  failFetch = false;
  streams: { from: number; handlers: StreamHandlers; closed: boolean }[] = [];
  timers: (() => void)[] = [];
  fetches = 0;

  fetchState(): Promise<StateResponse> {
    this.fetches++;
    if (this.failFetch) return Promise.reject(new Error('connection refused'));
    return Promise.resolve(stateAt(this.stateAt));
  }
  openEvents(from: number, handlers: StreamHandlers): () => void {
    const stream = { from, handlers, closed: false };
    this.streams.push(stream);
    return () => {
      stream.closed = true;
    };
  }
  setTimer(fn: () => void): unknown {
    this.timers.push(fn);
    return this.timers.length;
  }
  clearTimer(): void {}
  get stream() {
    const s = this.streams.at(-1);
    if (s === undefined) throw new Error('no stream');
    return s;
  }
  send(from: number, to: number): void {
    for (const e of events.slice(from, to + 1)) this.stream.handlers.onEvent(e);
  }
  runTimers(): void {
    const due = this.timers;
    this.timers = [];
    for (const fn of due) fn();
  }
}

const tick = () => new Promise((r) => setTimeout(r, 0));

async function started(opts = {}): Promise<{ t: FakeTransport; sync: Sync; snaps: Snapshot[] }> {
  const t = new FakeTransport();
  const snaps: Snapshot[] = [];
  const sync = new Sync(t, (s) => snaps.push(s), opts);
  sync.start();
  await tick();
  return { t, sync, snaps };
}

describe('Sync', () => {
  it('starts from /state and follows the stream after it, replaying history into metrics only', async () => {
    const { t, sync } = await started({ history: 100 });
    expect(t.stream.from).toBe(0);
    t.stream.handlers.onOpen();
    t.send(0, 36);
    expect(sync.snapshot.status).toBe('live');
    expect(sync.snapshot.state).toEqual(stateAt(36).state);
    // The two chats before the snapshot and after it are both in the history.
    expect(sync.snapshot.metrics.samples.map((s) => s.completion_tokens)).toEqual([16, 8]);
  });

  it('starts live at last_index + 1 without history', async () => {
    const { t } = await started({ history: 0 });
    expect(t.stream.from).toBe(11);
  });

  it('resyncs from /state when an index is missing', async () => {
    const { t, sync } = await started({ history: 0 });
    t.send(11, 12);
    t.stateAt = 20;
    t.send(14, 14); // 13 is lost
    expect(t.streams[0]?.closed).toBe(true);
    await tick();
    expect(t.stream.from).toBe(21);
    expect(sync.snapshot.state?.last_index).toBe(20);
    expect(sync.snapshot.resyncs).toBe(1);
    t.send(21, 36);
    expect(sync.snapshot.state).toEqual(stateAt(36).state);
  });

  it('ignores events it already folded (a replay after reconnect)', async () => {
    const { t, sync } = await started({ history: 0 });
    t.send(11, 20);
    t.send(15, 25);
    expect(sync.snapshot.state).toEqual(stateAt(25).state);
  });

  it('reconnects with back-off after a dropped stream and resyncs', async () => {
    const { t, sync } = await started({ history: 100 });
    t.send(0, 15);
    t.failFetch = true;
    t.stream.handlers.onError('event stream dropped');
    expect(sync.snapshot.status).toBe('reconnecting');
    expect(sync.snapshot.error).toBe('event stream dropped');
    t.runTimers();
    await tick(); // /state refused: back off again
    expect(sync.snapshot.status).toBe('reconnecting');
    expect(t.timers.length).toBe(1);
    t.failFetch = false;
    t.stateAt = 30;
    t.runTimers();
    await tick();
    expect(t.stream.from).toBe(16); // the missed events still feed the performance history
    t.stream.handlers.onOpen();
    expect(sync.snapshot.status).toBe('live');
    t.send(16, 36);
    expect(sync.snapshot.state).toEqual(stateAt(36).state);
    expect(sync.snapshot.metrics.samples).toHaveLength(2);
  });

  it('refreshes /state for an event kind it cannot fold, keeping later events in order', async () => {
    const { t, sync } = await started({ history: 0 });
    t.send(11, 12);
    const unknown: IndexedEvent = { ...(events[13] as IndexedEvent), event: { kind: 'from_the_future' } };
    t.stateAt = 13;
    t.stream.handlers.onEvent(unknown);
    t.send(14, 16); // arrive while /state is being fetched
    expect(sync.snapshot.state?.last_index).toBe(12);
    await tick();
    expect(t.streams).toHaveLength(1); // the stream stayed open
    expect(sync.snapshot.state).toEqual(stateAt(16).state);
  });

  it('stops cleanly', async () => {
    const { t, sync } = await started({ history: 0 });
    sync.stop();
    expect(t.stream.closed).toBe(true);
    expect(sync.snapshot.status).toBe('stopped');
  });
});
