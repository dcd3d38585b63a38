"""What placement sees of the cluster, built from `State` alone (pure: same state, same view).

A device enters the view when its node is up, its latest metrics say "ok", and it has
memory-free, bandwidth and compute figures. Devices that share one memory pool (an Apple
GPU and its host CPU: unified memory) enter as one: the one with the highest compute, so
that free memory is never counted twice. Links come from measured profiles; the one-way
latency is half the median RTT.
"""

from exo.shared.types.ids import NodeId
from exo.shared.types.state import State
from exo.shared.types.telemetry import DeviceSpec
from exo.shared.types.topology import ClusterView, DeviceId, DeviceProfile, LinkProfile


def device_key(node_id: NodeId, device_id: str) -> DeviceId:
    return DeviceId(f"{node_id}/{device_id}")


def excluded_devices(state: State) -> dict[DeviceId, str]:
    """Every known device placement cannot use, with the reason (for previews and errors)."""
    return _partition(state)[1]


def cluster_view(state: State) -> ClusterView:
    profiles = _partition(state)[0]
    links: list[LinkProfile] = []
    for src in sorted(state.links):
        for dst in sorted(state.links[src]):
            p = state.links[src][dst]
            if p.bandwidth_bytes_per_s <= 0:
                continue
            links.append(
                LinkProfile(
                    src=src,
                    dst=dst,
                    latency_s=p.rtt_ms / 2000.0,
                    bandwidth_bytes_per_s=p.bandwidth_bytes_per_s,
                )
            )
    return ClusterView(devices=tuple(profiles), links=tuple(links))


def _partition(state: State) -> tuple[list[DeviceProfile], dict[DeviceId, str]]:
    usable: list[DeviceProfile] = []
    excluded: dict[DeviceId, str] = {}
    for node_id in sorted(state.node_devices):
        node = state.node_devices[node_id]
        info = state.nodes.get(node_id)
        pools: dict[str, list[DeviceSpec]] = {}
        for device in node.devices:
            pools.setdefault(device.memory_pool, []).append(device)
        for members in pools.values():
            # One device per memory pool: the fastest at compute (ties: the accelerator).
            ranked = sorted(members, key=lambda d: (-d.compute.value, d.kind == "cpu", d.device_id))
            for shadowed in ranked[1:]:
                excluded[device_key(node_id, shadowed.device_id)] = (
                    f"shares memory pool {shadowed.memory_pool!r} with {ranked[0].device_id}"
                )
            device = ranked[0]
            key = device_key(node_id, device.device_id)
            metrics = node.metrics.get(device.device_id)
            if info is None or info.status != "up":
                excluded[key] = "node is not up"
            elif metrics is None:
                excluded[key] = "no metrics reported yet"
            elif metrics.status != "ok":
                excluded[key] = (
                    f"device status {metrics.status}: {metrics.status_detail or ''}".rstrip(": ")
                )
            elif device.memory_bandwidth.value <= 0 or device.compute.value <= 0:
                excluded[key] = "no bandwidth/compute figure (not in the spec table, not measured)"
            else:
                usable.append(
                    DeviceProfile(
                        device_id=key,
                        node_id=node_id,
                        name=device.name,
                        kind=device.kind,
                        memory_free_bytes=metrics.memory_free_bytes,
                        memory_bandwidth_bytes_per_s=device.memory_bandwidth.value,
                        compute_flops=device.compute.value,
                        cpu_kernels=device.cpu_kernels,
                    )
                )
    return sorted(usable, key=lambda d: d.device_id), excluded
