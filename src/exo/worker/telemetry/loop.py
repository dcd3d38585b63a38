"""The telemetry component: probes this node's devices and reports them as events.

At start: one `DeviceInventoryReported` (after the micro-benchmarks it needs), then one
`DeviceMetricsReported`. Then every `interval_s` it samples the devices and emits a metrics
event only when `ChangeLimiter` says so. Devices are re-enumerated every `reprobe_s` (sooner
after a GPU was lost); a different list is a new inventory event. Driver calls run in a
worker thread; nothing here raises out of `run` for a device error.
"""

import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import anyio
from loguru import logger

from exo.config import NodeConfig
from exo.shared.types.events import DeviceInventoryReported, DeviceMetricsReported, Event
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec
from exo.worker.telemetry.inventory import Inventory
from exo.worker.telemetry.policy import ChangeLimiter, TelemetryPolicy


class EventSink(Protocol):
    """What `exo.shared.views.EventSink` offers a producer."""

    async def emit(self, event: Event) -> int: ...


def _wall_ms() -> int:
    return int(time.time() * 1000)


class Telemetry:
    def __init__(
        self,
        *,
        node_id: NodeId,
        emitter: EventSink,
        inventory: Inventory,
        policy: TelemetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_ms: Callable[[], int] = _wall_ms,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._node_id = node_id
        self._emitter = emitter
        self._inventory = inventory
        self._policy = policy or TelemetryPolicy()
        self._clock = clock
        self._wall_ms = wall_ms
        self._sleep = sleep
        self._limiter = ChangeLimiter(self._policy)
        self._devices: tuple[DeviceSpec, ...] = ()
        self._probed_at = 0.0
        self.events_emitted = 0

    @property
    def devices(self) -> tuple[DeviceSpec, ...]:
        return self._devices

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Started once the first inventory (and its micro-benchmarks) is reported: a node
        starts its runners after that, so they do not load while the CPU is measured."""
        try:
            await self._probe(force_emit=True)
            task_status.started()
            while True:
                await self.tick()
                await self._sleep(self._policy.interval_s)
        finally:
            self._inventory.close()

    async def tick(self) -> None:
        """One sample (and a re-probe when due); emits what the policy lets through."""
        now = self._clock()
        due = now - self._probed_at >= self._policy.reprobe_s
        lost_due = (
            self._inventory.needs_reprobe and now - self._probed_at >= self._policy.reprobe_lost_s
        )
        if due or lost_due:
            await self._probe(force_emit=False)
        metrics = await anyio.to_thread.run_sync(self._inventory.sample)
        by_id = {d.device_id: d for d in self._devices}
        metrics = {k: m for k, m in metrics.items() if k in by_id}
        why = self._limiter.offer(self._clock(), by_id, metrics)
        if why is None:
            return
        logger.debug(f"device metrics event: {why}")
        await self._emit(
            DeviceMetricsReported(
                node_id=self._node_id, metrics=_sorted(metrics), reported_at_ms=self._wall_ms()
            )
        )

    async def _probe(self, *, force_emit: bool) -> None:
        devices = await anyio.to_thread.run_sync(self._inventory.probe)
        self._probed_at = self._clock()
        if devices == self._devices and not force_emit:
            return
        if devices != self._devices:
            names = ", ".join(f"{d.device_id} {d.name}" for d in devices)
            logger.info(f"devices: {names}")
        self._devices = devices
        await self._emit(
            DeviceInventoryReported(
                node_id=self._node_id, devices=devices, reported_at_ms=self._wall_ms()
            )
        )

    async def _emit(self, event: Event) -> None:
        await self._emitter.emit(event)
        self.events_emitted += 1


def _sorted(metrics: dict[str, DeviceMetrics]) -> dict[str, DeviceMetrics]:
    return {k: metrics[k] for k in sorted(metrics)}


def node_telemetry(
    node_id: NodeId, emitter: EventSink, config: NodeConfig, cpu_engine: str
) -> Telemetry:
    """The component a node runs: every device source of this machine, the default policy.

    `cpu_engine` is the engine this node runs models with on its CPU: compute is measured
    with it (a CPU measured with another engine predicts that engine's speed)."""
    from exo.worker.telemetry.inventory import default_sources
    from exo.worker.telemetry.profiler import EngineBenchmark

    benchmark = EngineBenchmark(cpu_engine)
    return Telemetry(
        node_id=node_id,
        emitter=emitter,
        inventory=Inventory(default_sources(), benchmark, profile=config.profile_devices),
        policy=TelemetryPolicy(interval_s=config.telemetry_interval_s),
    )
