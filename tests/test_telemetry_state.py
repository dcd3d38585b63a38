"""Telemetry events folded into state, and the placement view built from that state."""

from pydantic import TypeAdapter

from exo.shared.apply import fold
from exo.shared.topology_from_state import cluster_view, excluded_devices
from exo.shared.types.events import (
    DeviceInventoryReported,
    DeviceMetricsReported,
    Event,
    IndexedEvent,
    LinkProfileMeasured,
    NodeStarted,
)
from exo.shared.types.ids import NodeId
from exo.shared.types.state import State
from exo.shared.types.telemetry import DeviceMetrics, LinkProfile, PerfFigure
from exo.shared.types.topology import DeviceId
from tests.factories import device, indexed

A, B = NodeId("node-a"), NodeId("node-b")
_GIB = 1 << 30


def started(node: NodeId) -> NodeStarted:
    return NodeStarted(node_id=node, session="s", hostname="h", api_port=52415, started_at_ms=0)


def ok(free_gib: int) -> DeviceMetrics:
    return DeviceMetrics(memory_free_bytes=free_gib * _GIB, memory_used_bytes=0)


def link(rtt_ms: float, bandwidth: float) -> LinkProfile:
    return LinkProfile(
        rtt_ms=rtt_ms,
        rtt_min_ms=rtt_ms,
        bandwidth_bytes_per_s=bandwidth,
        ping_samples=10,
        bulk_bytes=4 << 20,
        measured_at_ms=5,
    )


def test_inventory_metrics_and_links_fold_into_state() -> None:
    evs: list[Event] = [
        DeviceInventoryReported(
            node_id=A, devices=(device("cpu"), device("cuda:0")), reported_at_ms=10
        ),
        DeviceMetricsReported(
            node_id=A,
            metrics={"cpu": ok(20), "cuda:0": ok(70), "cuda:9": ok(1)},
            reported_at_ms=20,
        ),
        LinkProfileMeasured(source=A, target=B, profile=link(0.4, 1e9)),
    ]
    state = fold(State(), indexed(evs))
    node = state.node_devices[A]
    assert [d.device_id for d in node.devices] == ["cpu", "cuda:0"]
    assert set(node.metrics) == {"cpu", "cuda:0"}  # an unknown device id is ignored
    assert (node.inventory_at_ms, node.metrics_at_ms) == (10, 20)
    assert state.links[A][B].rtt_ms == 0.4
    # A new inventory without the GPU drops its figures.
    after = fold(
        state,
        indexed(
            [DeviceInventoryReported(node_id=A, devices=(device("cpu"),), reported_at_ms=30)],
            start=3,
        ),
    )
    assert set(after.node_devices[A].metrics) == {"cpu"}
    # Metrics before any inventory describe nothing.
    orphan = fold(
        State(),
        indexed([DeviceMetricsReported(node_id=B, metrics={"cpu": ok(1)}, reported_at_ms=1)]),
    )
    assert orphan.node_devices == {}


def test_state_with_telemetry_round_trips_through_json() -> None:
    evs: list[Event] = [
        DeviceInventoryReported(node_id=A, devices=(device("cuda:0"),), reported_at_ms=1),
        DeviceMetricsReported(node_id=A, metrics={"cuda:0": ok(3)}, reported_at_ms=2),
        LinkProfileMeasured(source=A, target=B, profile=link(1.0, 2e8)),
    ]
    log = indexed(evs)
    adapter = TypeAdapter(IndexedEvent)
    replayed = [adapter.validate_json(adapter.dump_json(e)) for e in log]
    live = fold(State(), log)
    assert fold(State(), replayed).state_hash() == live.state_hash()
    assert State.model_validate_json(live.model_dump_json()) == live


def test_cluster_view_from_state() -> None:
    slow_cpu = device("cpu", name="AMD EPYC", pool="host").model_copy(
        update={"compute": PerfFigure(value=6e9, source="measured", detail="mlx")}
    )
    metal = device("metal:0", name="Apple M2 Max", pool="host")
    unrated = device("cuda:1", name="Mystery").model_copy(
        update={"compute": PerfFigure(value=0.0, source="unknown")}
    )
    evs: list[Event] = [
        started(A),
        started(B),
        DeviceInventoryReported(
            node_id=A,
            devices=(
                device("cuda:0"),
                unrated,
                device("cpu").model_copy(update={"cpu_kernels": "avx2"}),
            ),
            reported_at_ms=1,
        ),
        DeviceMetricsReported(
            node_id=A,
            metrics={"cuda:0": ok(70), "cuda:1": ok(70), "cpu": ok(20)},
            reported_at_ms=2,
        ),
        DeviceInventoryReported(node_id=B, devices=(slow_cpu, metal), reported_at_ms=1),
        DeviceMetricsReported(
            node_id=B, metrics={"cpu": ok(50), "metal:0": ok(48)}, reported_at_ms=2
        ),
        LinkProfileMeasured(source=A, target=B, profile=link(2.0, 1.25e8)),
    ]
    state = fold(State(), indexed(evs))
    view = cluster_view(state)
    ids = [d.device_id for d in view.devices]
    assert ids == ["node-a/cpu", "node-a/cuda:0", "node-b/metal:0"]
    gpu = next(d for d in view.devices if d.device_id == "node-a/cuda:0")
    assert gpu.memory_free_bytes == 70 * _GIB
    assert gpu.memory_bandwidth_bytes_per_s == 3.35e12
    kernels = {d.device_id: d.cpu_kernels for d in view.devices}
    assert kernels == {"node-a/cpu": "avx2", "node-a/cuda:0": None, "node-b/metal:0": None}
    (ab,) = view.links
    assert (ab.src, ab.dst, ab.latency_s, ab.bandwidth_bytes_per_s) == (A, B, 0.001, 1.25e8)
    assert view.link(B, A) == ab  # symmetric fallback
    excluded = excluded_devices(state)
    assert (
        "node-a/cuda:1" in excluded
        and "not in the spec table" in excluded[DeviceId("node-a/cuda:1")]
    )
    assert excluded[DeviceId("node-b/cpu")].startswith("shares memory pool 'host'")

    # A lost GPU leaves the view with its reason.
    lost = DeviceMetrics(status="lost", status_detail="NVML: GPU is lost")
    later = fold(
        state,
        indexed(
            [
                DeviceMetricsReported(
                    node_id=A, metrics={"cuda:0": lost, "cpu": ok(20)}, reported_at_ms=3
                )
            ],
            start=len(evs),
        ),
    )
    assert "node-a/cuda:0" not in [d.device_id for d in cluster_view(later).devices]
    assert (
        excluded_devices(later)[DeviceId("node-a/cuda:0")]
        == "device status lost: NVML: GPU is lost"
    )
