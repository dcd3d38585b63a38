// The live snapshot for the components: Sync's output, coalesced to at most one
// re-render per frame-ish interval (a replay of hundreds of events renders once).

import { browserTransport, type Snapshot, Sync } from './sync';
import { type DeviceSeries, recordDeviceSeries } from './telemetry';
import { emptyMetrics } from './metrics';

const FLUSH_MS = 50;

export class Live {
  snapshot: Snapshot = $state.raw({
    status: 'connecting',
    node_id: null,
    state: null,
    metrics: emptyMetrics(),
    error: null,
    resyncs: 0,
  });
  series: Record<string, DeviceSeries> = $state.raw({});
  private sync: Sync;
  private pending: Snapshot | null = null;
  private timer: ReturnType<typeof setTimeout> | null = null;

  constructor() {
    this.sync = new Sync(browserTransport(), (s) => this.schedule(s));
  }

  start(): void {
    this.sync.start();
  }

  stop(): void {
    this.sync.stop();
  }

  private schedule(s: Snapshot): void {
    this.pending = s;
    if (this.timer !== null) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      const next = this.pending;
      this.pending = null;
      if (next === null) return;
      this.snapshot = next;
      if (next.state !== null) this.series = recordDeviceSeries(this.series, next.state);
    }, FLUSH_MS);
  }
}
