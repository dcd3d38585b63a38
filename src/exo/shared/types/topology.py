"""What placement knows about the cluster: each device and each link between nodes.

Telemetry fills these from state (measured figures, or a spec table keyed by device name);
tests and `exo place` fill them from JSON. All figures are plain SI units.
"""

from typing import Literal, NewType

from pydantic import Field, model_validator

from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import CpuKernels

# A device is unique across the cluster, e.g. "node-a/cuda:0" (placement never parses it).
DeviceId = NewType("DeviceId", str)

DeviceKind = Literal["cpu", "cuda", "metal"]


class DeviceProfile(Frozen):
    """One device that can run one pipeline stage; a node may hold several."""

    device_id: DeviceId
    node_id: NodeId
    # Marketing name, e.g. "NVIDIA H100 80GB HBM3"; the spec table's key.
    name: str
    kind: DeviceKind
    memory_free_bytes: int = Field(ge=0)
    # Achievable (or peak, from a spec sheet) memory read bandwidth.
    memory_bandwidth_bytes_per_s: float = Field(gt=0)
    # Dense 16-bit matmul throughput.
    compute_flops: float = Field(gt=0)
    # CPUs: the variant of our quantized kernels it runs (telemetry's `DeviceSpec`).
    cpu_kernels: CpuKernels | None = None


class LinkProfile(Frozen):
    """The network path from one node to another; used for both directions unless both are given."""

    src: NodeId
    dst: NodeId
    latency_s: float = Field(ge=0)
    bandwidth_bytes_per_s: float = Field(gt=0)


class ClusterView(Frozen):
    """The devices placement may use and the measured links between their nodes."""

    devices: tuple[DeviceProfile, ...]
    links: tuple[LinkProfile, ...] = ()

    @model_validator(mode="after")
    def _unique_devices(self) -> "ClusterView":
        ids = [d.device_id for d in self.devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids must be unique across the cluster")
        return self

    def link(self, src: NodeId, dst: NodeId) -> LinkProfile | None:
        """The link src -> dst, falling back to dst -> src (links are usually symmetric)."""
        reverse: LinkProfile | None = None
        for link in self.links:
            if link.src == src and link.dst == dst:
                return link
            if link.src == dst and link.dst == src:
                reverse = link
        return reverse
