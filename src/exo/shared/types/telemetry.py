"""Device and link telemetry: what a node has, how it is doing, and how nodes connect.

Static facts (`DeviceSpec`) change rarely and travel in `DeviceInventoryReported`; live
figures (`DeviceMetrics`) travel in rate-limited, change-detected `DeviceMetricsReported`
events; measured links in `LinkProfileMeasured`. Placement reads all three from `State`.
"""

from typing import Literal

from pydantic import Field

from exo.shared.types.base import Frozen

# "cpu": the host CPU (and its RAM); "cuda": an NVIDIA GPU; "metal": an Apple GPU.
DeviceKind = Literal["cpu", "cuda", "metal"]

# Where a performance figure came from:
# - "spec_table": the vendor's published figure for this device name (cited in the table);
# - "measured": a micro-benchmark run on this device by this node;
# - "unknown": neither (the value is 0 and placement must treat the device as unrated).
FigureSource = Literal["spec_table", "measured", "unknown"]

# The variant of our quantized CPU kernels (engines/torch/kernels) a CPU runs: AVX512-VNNI
# (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd: ~3x slower prefill), or neither (torch's own
# kernels). Placement costs a torch CPU stage by it.
CpuKernels = Literal["avx512-vnni", "avx2", "none"]

# "ok": readable; "error": the last reading failed (transient or unsupported);
# "lost": the driver reports the device gone (NVML_ERROR_GPU_IS_LOST and friends).
DeviceStatus = Literal["ok", "error", "lost"]


class PerfFigure(Frozen):
    value: float = Field(ge=0.0)
    source: FigureSource
    # The citation (spec table) or the benchmark that produced it (measured).
    detail: str = ""


class DeviceSpec(Frozen):
    """One device's static facts; they change only when the hardware or driver does."""

    # Stable within the node: "cpu", "cuda:<index>", "metal:<index>".
    device_id: str
    kind: DeviceKind
    name: str
    index: int = Field(ge=0)
    # NVIDIA's "GPU-..." UUID; pin a runner to it with CUDA_VISIBLE_DEVICES=<uuid>.
    uuid: str | None = None
    memory_total_bytes: int = Field(ge=0)
    # Devices that share one pool of memory (the CPU and an Apple GPU: unified memory)
    # carry the same pool id; placement must not count that memory twice.
    memory_pool: str
    # Bytes per second the device reads from its own memory.
    memory_bandwidth: PerfFigure
    # Dense floating-point operations per second at the engine's working precision
    # (fp16/bf16 tensor cores for NVIDIA, fp32 GPU ALUs for Apple, fp32 for a CPU).
    compute: PerfFigure
    cores: int | None = Field(default=None, ge=1)
    # CPUs: which kernel variant it runs (None: not known, e.g. off Linux, or another kind).
    cpu_kernels: CpuKernels | None = None
    compute_capability: str | None = None
    pcie_max_generation: int | None = Field(default=None, ge=1)
    pcie_max_width: int | None = Field(default=None, ge=1)
    power_limit_w: float | None = Field(default=None, ge=0.0)
    max_sm_clock_mhz: int | None = Field(default=None, ge=0)
    driver_version: str | None = None


class DeviceMetrics(Frozen):
    """One device's live figures at one instant."""

    status: DeviceStatus = "ok"
    status_detail: str | None = None
    memory_used_bytes: int = Field(default=0, ge=0)
    memory_free_bytes: int = Field(default=0, ge=0)
    utilization_pct: float | None = Field(default=None, ge=0.0, le=100.0)
    temperature_c: float | None = None
    power_w: float | None = Field(default=None, ge=0.0)
    sm_clock_mhz: int | None = Field(default=None, ge=0)
    pcie_generation: int | None = Field(default=None, ge=0)
    pcie_width: int | None = Field(default=None, ge=0)


class LinkProfile(Frozen):
    """A measured path from one node to another (the measuring node is the source)."""

    rtt_ms: float = Field(ge=0.0)
    rtt_min_ms: float = Field(ge=0.0)
    # Bulk bytes per second, source -> destination.
    bandwidth_bytes_per_s: float = Field(ge=0.0)
    ping_samples: int = Field(ge=1)
    bulk_bytes: int = Field(ge=0)
    measured_at_ms: int = Field(ge=0)


class NodeDevices(Frozen):
    """What the state knows of one node's devices."""

    devices: tuple[DeviceSpec, ...] = ()
    # Keyed by `DeviceSpec.device_id`; only devices of the current inventory.
    metrics: dict[str, DeviceMetrics] = Field(default_factory=dict[str, DeviceMetrics])
    inventory_at_ms: int = Field(default=0, ge=0)
    metrics_at_ms: int = Field(default=0, ge=0)
