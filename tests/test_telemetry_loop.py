"""The telemetry component end to end (fake clock, scripted source) and `exo devices`."""

import io
import json
from contextlib import redirect_stdout

import anyio

from exo.shared.types.events import DeviceInventoryReported, DeviceMetricsReported, Event
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec
from exo.worker.cpu_features import cpu_flags, kernels_for
from exo.worker.engines.choice import this_machines_engine
from exo.worker.telemetry.cli import devices_main, render_table
from exo.worker.telemetry.inventory import UNKNOWN, CpuSource, Inventory
from exo.worker.telemetry.loop import Telemetry
from exo.worker.telemetry.policy import TelemetryPolicy
from exo.worker.telemetry.profiler import Measurement

_GIB = 1 << 30


class ScriptedSource:
    """A device source whose readings the test sets (no hardware involved)."""

    def __init__(self) -> None:
        self.free = 10 * _GIB
        self.closed = False

    def probe(self) -> list[DeviceSpec]:
        return [
            DeviceSpec(
                device_id="cpu",
                kind="cpu",
                name="Test CPU",
                index=0,
                memory_total_bytes=16 * _GIB,
                memory_pool="host",
                memory_bandwidth=UNKNOWN,
                compute=UNKNOWN,
                cores=8,
            )
        ]

    def sample(self) -> dict[str, DeviceMetrics]:
        return {"cpu": DeviceMetrics(memory_free_bytes=self.free, memory_used_bytes=0)}

    def close(self) -> None:
        self.closed = True


class Bench:
    def measure(self, device: DeviceSpec) -> Measurement | None:
        return Measurement(2e10, "copy", 1e11, "matmul")


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> int:
        self.events.append(event)
        return len(self.events) - 1


def test_run_reports_inventory_then_only_changes() -> None:
    source = ScriptedSource()
    sink = Sink()
    policy = TelemetryPolicy(interval_s=5.0)
    now = [0.0]
    ticks = [0]
    scopes: list[anyio.CancelScope] = []

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds
        ticks[0] += 1
        if ticks[0] == 20:
            source.free = 4 * _GIB  # a model got loaded
        if ticks[0] == 40:
            scopes[0].cancel()  # ends the loop as the node's task group would
        await anyio.lowlevel.checkpoint()

    telemetry = Telemetry(
        node_id=NodeId("node-a"),
        emitter=sink,
        inventory=Inventory([source], Bench()),
        policy=policy,
        clock=lambda: now[0],
        wall_ms=lambda: int(now[0] * 1000),
        sleep=fake_sleep,
    )

    async def scenario() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await telemetry.run()

    anyio.run(scenario)
    assert source.closed
    inventory, first, change = sink.events
    assert isinstance(inventory, DeviceInventoryReported)
    (cpu,) = inventory.devices
    assert cpu.memory_bandwidth.source == "measured" and cpu.compute.value == 1e11
    assert isinstance(first, DeviceMetricsReported) and first.reported_at_ms == 0
    assert isinstance(change, DeviceMetricsReported)
    assert change.metrics["cpu"].memory_free_bytes == 4 * _GIB
    # Shown on the first sample after the change: within one interval.
    assert change.reported_at_ms == 20 * 5000


def test_started_once_the_first_inventory_is_reported() -> None:
    # The node starts its runners when `tg.start(telemetry.run)` returns: by then the
    # devices are measured and reported, so no runner loads during the micro-benchmarks.
    sink = Sink()
    telemetry = Telemetry(
        node_id=NodeId("node-a"),
        emitter=sink,
        inventory=Inventory([ScriptedSource()], Bench()),
        policy=TelemetryPolicy(interval_s=5.0),
    )
    seen: list[list[Event]] = []

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            await tg.start(telemetry.run)
            seen.append(list(sink.events))
            tg.cancel_scope.cancel()

    anyio.run(scenario)
    (reported,) = seen[0]
    assert isinstance(reported, DeviceInventoryReported)
    assert reported.devices[0].compute.source == "measured"


def test_real_cpu_source_reads_this_machine() -> None:
    source = CpuSource()
    (cpu,) = source.probe()
    metrics = source.sample()["cpu"]
    assert cpu.kind == "cpu" and cpu.cores is not None and cpu.memory_total_bytes > 0
    assert cpu.cpu_kernels == kernels_for(cpu_flags())
    assert 0 < metrics.memory_free_bytes <= cpu.memory_total_bytes


def test_exo_devices_json() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert devices_main(["--json"]) == 0
    doc = json.loads(out.getvalue())
    kinds = [d["kind"] for d in doc["devices"]]
    assert "cpu" in kinds
    for d in doc["devices"]:
        assert d["name"] and d["memory_total_bytes"] > 0
        for figure in ("memory_bandwidth", "compute"):
            assert d[figure]["source"] in ("spec_table", "measured")
            assert d[figure]["value"] > 0 and d[figure]["detail"]
        assert d["metrics"]["status"] == "ok"
    # Rated for the engine the daemon runs here, as the daemon rates it.
    (cpu,) = [d for d in doc["devices"] if d["kind"] == "cpu"]
    rater = "mlx" if this_machines_engine() == "mlx" else "numpy"
    assert cpu["compute"]["detail"].startswith(f"{rater} f32 matmul")


def test_table_rendering() -> None:
    source = ScriptedSource()
    inventory = Inventory([source], Bench())
    text = render_table(inventory.probe(), inventory.sample())
    assert "Test CPU" in text and "20.0 GB/s (measured)" in text and "100.0 GFLOPS" in text
