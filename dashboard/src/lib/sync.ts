// Live state: GET /state once, then fold /events?from=last_index+1 client-side.
// A gap in the indices, a stale term or a dropped stream closes the stream, refetches
// /state and resumes after it (with back-off while the node is unreachable). An event kind
// this dashboard cannot fold (from a newer daemon) refreshes the state from /state while
// the stream stays open and later events wait in order.

import { apply, ApplyError, UnknownEventError } from './apply';
import { emptyMetrics, type Metrics, observe, seedMetrics } from './metrics';
import type { IndexedEvent, State, StateResponse } from './types';

export interface StreamHandlers {
  onOpen(): void;
  onEvent(event: IndexedEvent): void;
  onError(reason: string): void;
}

export interface Transport {
  fetchState(): Promise<StateResponse>;
  /** Opens the event stream from `from`; returns a function that closes it. */
  openEvents(from: number, handlers: StreamHandlers): () => void;
  setTimer(fn: () => void, ms: number): unknown;
  clearTimer(handle: unknown): void;
}

export type SyncStatus = 'connecting' | 'live' | 'reconnecting' | 'stopped';

export interface Snapshot {
  status: SyncStatus;
  node_id: string | null;
  state: State | null;
  metrics: Metrics;
  /** Why the last connection dropped, while reconnecting. */
  error: string | null;
  /** How many times the dashboard resynced from /state. */
  resyncs: number;
}

export interface SyncOptions {
  /** On the first connect, replay this many past events into the performance history. */
  history: number;
  retryMs: number;
  maxRetryMs: number;
  refreshDelayMs: number;
}

const DEFAULTS: SyncOptions = { history: 1000, retryMs: 500, maxRetryMs: 5000, refreshDelayMs: 250 };

export class Sync {
  private readonly opts: SyncOptions;
  private snap: Snapshot = {
    status: 'connecting',
    node_id: null,
    state: null,
    metrics: emptyMetrics(),
    error: null,
    resyncs: 0,
  };
  private close: (() => void) | null = null;
  private generation = 0;
  private retry: number;
  private timer: unknown = null;
  private refreshing = false;
  private buffered: IndexedEvent[] = [];

  constructor(
    private readonly transport: Transport,
    private readonly onChange: (snapshot: Snapshot) => void,
    opts: Partial<SyncOptions> = {},
  ) {
    this.opts = { ...DEFAULTS, ...opts };
    this.retry = this.opts.retryMs;
  }

  get snapshot(): Snapshot {
    return this.snap;
  }

  start(): void {
    void this.connect();
  }

  stop(): void {
    this.generation++;
    this.close?.();
    this.close = null;
    if (this.timer !== null) this.transport.clearTimer(this.timer);
    this.timer = null;
    this.update({ status: 'stopped' });
  }

  /** Drop the stream and resync from /state now (also what a gap or a drop does). */
  resync(reason: string): void {
    this.close?.();
    this.close = null;
    this.update({ status: 'reconnecting', error: reason, resyncs: this.snap.resyncs + 1 });
    void this.connect();
  }

  private update(patch: Partial<Snapshot>): void {
    this.snap = { ...this.snap, ...patch };
    this.onChange(this.snap);
  }

  private async connect(): Promise<void> {
    const gen = ++this.generation;
    this.refreshing = false;
    this.buffered = [];
    let response: StateResponse;
    try {
      response = await this.transport.fetchState();
    } catch (err) {
      if (gen === this.generation) this.scheduleReconnect(`GET /state failed: ${String(err)}`);
      return;
    }
    if (gen !== this.generation) return;
    const state = response.state;
    const metrics = seedMetrics(this.snap.metrics, state);
    this.update({ node_id: response.node_id, state, metrics });
    // Events up to state.last_index only feed the performance history: replay up to
    // `history` of them (the first time) or those missed while disconnected.
    const from = Math.max(
      0,
      Math.min(state.last_index + 1, metrics.last_index + 1),
      state.last_index + 1 - this.opts.history,
    );
    this.close = this.transport.openEvents(from, {
      onOpen: () => {
        if (gen !== this.generation) return;
        this.retry = this.opts.retryMs;
        this.update({ status: 'live', error: null });
      },
      onEvent: (event) => {
        if (gen === this.generation) this.receive(event);
      },
      onError: (reason) => {
        if (gen !== this.generation) return;
        this.close?.();
        this.close = null;
        this.scheduleReconnect(reason);
      },
    });
  }

  private scheduleReconnect(reason: string): void {
    const gen = ++this.generation;
    this.update({ status: 'reconnecting', error: reason });
    const delay = this.retry;
    this.retry = Math.min(this.opts.maxRetryMs, this.retry * 2);
    if (this.timer !== null) this.transport.clearTimer(this.timer);
    this.timer = this.transport.setTimer(() => {
      this.timer = null;
      if (gen !== this.generation) return;
      this.update({ resyncs: this.snap.resyncs + 1 });
      void this.connect();
    }, delay);
  }

  private receive(event: IndexedEvent): void {
    if (this.snap.status !== 'live') this.update({ status: 'live', error: null });
    this.retry = this.opts.retryMs;
    if (this.refreshing) {
      this.buffered.push(event);
      return;
    }
    this.process(event);
  }

  private process(event: IndexedEvent): void {
    const metrics = observe(this.snap.metrics, event);
    const state = this.snap.state;
    if (state === null || event.index <= state.last_index) {
      if (metrics !== this.snap.metrics) this.update({ metrics });
      return;
    }
    if (event.index !== state.last_index + 1) {
      this.update({ metrics });
      this.resync(`missed events ${state.last_index + 1}..${event.index - 1}`);
      return;
    }
    try {
      this.update({ state: apply(state, event), metrics });
    } catch (err) {
      if (err instanceof UnknownEventError) {
        this.update({ metrics });
        this.refresh(event);
      } else if (err instanceof ApplyError) {
        this.resync(err.message);
      } else {
        throw err;
      }
    }
  }

  /** Fetch /state to cover an event we cannot fold; events arriving meanwhile wait. */
  private refresh(pending: IndexedEvent): void {
    this.refreshing = true;
    this.buffered = [pending];
    const gen = this.generation;
    const attempt = (tries: number) => {
      this.transport
        .fetchState()
        .then((response) => {
          if (gen !== this.generation) return;
          const current = this.snap.state;
          if (current === null || response.state.last_index >= pending.index) {
            this.update({ state: response.state, resyncs: this.snap.resyncs + 1 });
            const queued = this.buffered;
            this.buffered = [];
            this.refreshing = false;
            for (const e of queued) {
              if (this.refreshing) this.buffered.push(e);
              else this.process(e);
            }
          } else if (tries < 20) {
            this.transport.setTimer(() => attempt(tries + 1), this.opts.refreshDelayMs);
          } else {
            this.resync('/state lags the event stream');
          }
        })
        .catch((err: unknown) => {
          if (gen === this.generation) this.resync(`GET /state failed: ${String(err)}`);
        });
    };
    attempt(0);
  }
}

/** The browser transport: fetch + EventSource against the node serving the page. */
export function browserTransport(base = ''): Transport {
  return {
    async fetchState() {
      const r = await fetch(`${base}/state`, { cache: 'no-store' });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      return (await r.json()) as StateResponse;
    },
    openEvents(from, handlers) {
      const source = new EventSource(`${base}/events?from=${from}`);
      source.onopen = () => handlers.onOpen();
      source.onmessage = (m: MessageEvent<string>) => {
        let parsed: IndexedEvent;
        try {
          parsed = JSON.parse(m.data) as IndexedEvent;
        } catch {
          handlers.onError('unparseable event');
          return;
        }
        handlers.onEvent(parsed);
      };
      // We reconnect ourselves (resync from /state), not with EventSource's retry.
      source.onerror = () => {
        source.close();
        handlers.onError('event stream dropped');
      };
      return () => source.close();
    },
    setTimer: (fn, ms) => setTimeout(fn, ms),
    clearTimer: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
  };
}
