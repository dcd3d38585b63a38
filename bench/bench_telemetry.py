"""Telemetry overhead and log growth.

1. Cost of one sample of this machine's devices (real sources), and the CPU% that is at
   the default interval.
2. The real telemetry loop at the default interval for `--seconds` (default 60): the CPU
   time the process spent, the events it emitted and why.
3. An idle 3-node cluster simulated for 24 hours through the real change limiter (idle
   readings jitter below every threshold): events per node-hour written to the log, and the
   delay before a change after a quiet spell shows.
4. The worst case under constant change, from the policy.

    uv run python bench/bench_telemetry.py [--seconds 60]
"""

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import anyio
from loguru import logger

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exo.shared.types.events import DeviceMetricsReported, Event
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, PerfFigure
from exo.worker.telemetry.inventory import Inventory, default_sources
from exo.worker.telemetry.loop import Telemetry
from exo.worker.telemetry.policy import ChangeLimiter, TelemetryPolicy, events_per_hour
from exo.worker.telemetry.profiler import EngineBenchmark

_GIB = 1 << 30


class CountingSink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> int:
        self.events.append(event)
        return len(self.events) - 1


def sample_cost(inventory: Inventory, n: int = 200) -> tuple[float, float]:
    walls: list[float] = []
    cpus: list[float] = []
    for _ in range(n):
        w, c = time.perf_counter(), time.process_time()
        inventory.sample()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.mean(walls), statistics.mean(cpus)


async def run_loop(
    seconds: float, policy: TelemetryPolicy
) -> tuple[CountingSink, float, float, list[str]]:
    sink = CountingSink()
    reasons: list[str] = []
    logger.remove()
    logger.add(
        lambda m: reasons.append(str(m).strip()),
        level="DEBUG",
        format="{message}",
        filter=lambda r: "device metrics event" in r["message"],
    )
    inventory = Inventory(default_sources(), EngineBenchmark(), profile=False)
    telemetry = Telemetry(node_id=NodeId("bench"), emitter=sink, inventory=inventory, policy=policy)
    probe_start = time.perf_counter()
    inventory.probe()  # warm: the first probe runs the micro-benchmarks
    probe_s = time.perf_counter() - probe_start
    cpu0 = time.process_time()
    with anyio.move_on_after(seconds):
        await telemetry.run()
    cpu = time.process_time() - cpu0
    return sink, cpu, probe_s, reasons


def simulate_idle_cluster(
    policy: TelemetryPolicy, nodes: int, hours: float, seed: int = 3
) -> list[int]:
    rng = random.Random(seed)
    fig = PerfFigure(value=1e12, source="spec_table", detail="")
    devices = {
        "cpu": DeviceSpec(
            device_id="cpu",
            kind="cpu",
            name="cpu",
            index=0,
            memory_total_bytes=64 * _GIB,
            memory_pool="host",
            memory_bandwidth=fig,
            compute=fig,
        ),
        "cuda:0": DeviceSpec(
            device_id="cuda:0",
            kind="cuda",
            name="gpu",
            index=0,
            memory_total_bytes=24 * _GIB,
            memory_pool="cuda:0",
            memory_bandwidth=fig,
            compute=fig,
            power_limit_w=450.0,
        ),
    }

    def idle() -> dict[str, DeviceMetrics]:
        return {
            "cpu": DeviceMetrics(
                memory_free_bytes=int((50 + rng.uniform(-0.2, 0.2)) * _GIB),
                utilization_pct=rng.uniform(0, 8),
            ),
            "cuda:0": DeviceMetrics(
                memory_free_bytes=int((23.5 + rng.uniform(-0.01, 0.01)) * _GIB),
                utilization_pct=rng.choice([0.0, 0.0, 2.0, 5.0]),
                temperature_c=35 + rng.uniform(-3, 3),
                power_w=25 + rng.uniform(-8, 8),
            ),
        }

    counts: list[int] = []
    for _ in range(nodes):
        limiter = ChangeLimiter(policy)
        count = 1  # the inventory event at start
        for i in range(int(hours * 3600 / policy.interval_s)):
            if limiter.offer(i * policy.interval_s, devices, idle()) is not None:
                count += 1
        counts.append(count)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    policy = TelemetryPolicy()

    inventory = Inventory(default_sources(), None)
    devices = inventory.probe()
    wall, cpu = sample_cost(inventory)
    inventory.close()
    print(f"devices: {', '.join(f'{d.device_id} ({d.name})' for d in devices)}")
    print(
        f"one sample: {wall * 1e3:.3f} ms wall, {cpu * 1e3:.3f} ms CPU "
        f"-> {100 * cpu / policy.interval_s:.4f}% of one core at {policy.interval_s:g} s"
    )

    sink, loop_cpu, probe_s, reasons = anyio.run(run_loop, args.seconds, policy)
    metrics_events = sum(isinstance(e, DeviceMetricsReported) for e in sink.events)
    print(
        f"real loop, {args.seconds:g} s at {policy.interval_s:g} s: {loop_cpu:.3f} s CPU "
        f"({100 * loop_cpu / args.seconds:.3f}% of one core), {len(sink.events)} events "
        f"({metrics_events} metrics); start-up probe with micro-benchmarks {probe_s:.2f} s"
    )
    for r in reasons:
        print(f"  {r}")

    hours = 24.0
    counts = simulate_idle_cluster(policy, nodes=3, hours=hours)
    per_node_hour = sum(counts) / (3 * hours)
    print(
        f"simulated idle 3-node cluster, {hours:g} h: {sum(counts)} events, "
        f"{per_node_hour:.2f} per node-hour (policy says {events_per_hour(policy, idle=True):g} + start)"
    )
    print(
        f"worst case under constant change: {events_per_hour(policy, idle=False):g} per node-hour "
        f"(burst {policy.burst} + refill {policy.refill_per_hour:g}/h); a change after quiet shows "
        f"within one interval ({policy.interval_s:g} s)"
    )


if __name__ == "__main__":
    main()
