"""Placement requests and their answers: a pipeline of stages with predicted figures, or why not."""

from typing import Literal

from pydantic import Field, model_validator

from exo.shared.types.base import Frozen
from exo.shared.types.engines import ENGINE_DEVICE_KINDS, EngineName
from exo.shared.types.ids import ModelId, NodeId
from exo.shared.types.telemetry import CpuKernels
from exo.shared.types.topology import DeviceId, DeviceKind

# latency: minimise single-stream time per token; throughput: minimise the bottleneck stage.
Objective = Literal["latency", "throughput"]

GIB = 1 << 30
MIB = 1 << 20


class EngineEfficiency(Frozen):
    """How close one engine gets to a device kind's memory-bandwidth roofline when decoding.

    Calibrated by `bench/placement/calibrate.py`; the figures and their sources are in
    docs/placement.md ("Calibration").
    """

    engine: EngineName
    kind: DeviceKind
    # Share of the device's bandwidth figure a decode step's weight reads reach.
    bandwidth_fraction: float = Field(gt=0, le=1)
    # Fixed cost per layer per token, whatever its size (kernel dispatch, norms, attention).
    layer_overhead_s: float = Field(default=0.0, ge=0)
    # Fixed cost per stage per token (embedding or receive, sampling or send, the step loop).
    token_overhead_s: float = Field(default=0.0, ge=0)
    # Prefill's flops per second as a share of the device's compute figure (telemetry's f32
    # matmul): above 1 where the engine's quantized kernels beat that matmul. None: the
    # cost model's `compute_efficiency`.
    compute_fraction: float | None = Field(default=None, gt=0)
    # CPUs: the kernel variant this entry was measured with; None: any (an entry for the
    # device's own variant, where there is one, comes first).
    cpu_kernels: CpuKernels | None = None
    source: str = ""


# The built-in model (SmolLM2-135M) on the 2-core development VM (AMD EPYC, AVX-512),
# against the bandwidth figure telemetry reports for that CPU (a numpy copy, ~28 GB/s), by
# `bench/placement/calibrate.py`: docs/placement.md, "Calibration".
_TORCH_CPU = EngineEfficiency(
    engine="torch",
    kind="cpu",
    bandwidth_fraction=0.686,
    layer_overhead_s=0.000037,
    token_overhead_s=0.00024,
    compute_fraction=1.5,
    source="compiled decode, our kernels: 31.4 GB/s of 45.7; 4.19 ms a step; 225.8 "
    "tokens/s via generate; prefill of 512 tokens 331 ms (329 GFLOP/s, figure 196-227)",
)
DEFAULT_ENGINE_EFFICIENCY: tuple[EngineEfficiency, ...] = (
    _TORCH_CPU,
    # Our kernels' AVX2 variant (a 2-core EPYC without AVX-512): decode as above, prefill not.
    _TORCH_CPU.model_copy(
        update={
            "cpu_kernels": "avx2",
            "compute_fraction": 0.55,
            "source": "AVX2 variant: a decode step 9.70 ms against 9.43 predicted with the "
            "AVX-512 entry; prefill of 512 tokens 1112 ms (97 GFLOP/s, figure 176.7)",
        }
    ),
    EngineEfficiency(
        engine="mlx",
        kind="cpu",
        bandwidth_fraction=0.023,
        compute_fraction=0.38,
        source="MLX quantized CPU kernels: 7.3 tokens/s for ~87 MB read per token; prefill "
        "of 512 tokens 36.8 s (2.96 GFLOP/s, figure 7.8)",
    ),
)


class CostParams(Frozen):
    """The cost model's constants; the defaults are documented in docs/placement.md."""

    # Spec-sheet figures are peaks; decode kernels reach roughly this share of them. Used
    # for an (engine, device kind) pair that `engine_efficiency` does not calibrate.
    bandwidth_efficiency: float = Field(default=0.8, gt=0, le=1)
    compute_efficiency: float = Field(default=0.5, gt=0, le=1)
    # Runtime context, allocator slack and activation workspace, per device kind.
    overhead_cuda_bytes: int = Field(default=768 * MIB, ge=0)
    overhead_metal_bytes: int = Field(default=512 * MIB, ge=0)
    overhead_cpu_bytes: int = Field(default=384 * MIB, ge=0)
    # A torch runner on CPU holds far more beside its weights: torch's libraries and the
    # compiler's graphs (measured: ~0.9-1.06 GB resident beyond the built-in model's).
    overhead_torch_cpu_bytes: int = Field(default=1024 * MIB, ge=0)
    # Free memory is a moving target: keep this share of it unused.
    memory_margin: float = Field(default=0.05, ge=0, lt=1)
    # Hand-off between two devices of one node: a device-host-device copy, no network.
    # A network hop pays this copy too, plus the link.
    local_latency_s: float = Field(default=10e-6, ge=0)
    local_bandwidth_bytes_per_s: float = Field(default=10e9, gt=0)
    # The sampled token travels back to the first stage in a small frame.
    token_frame_bytes: int = Field(default=64, gt=0)
    # Per engine and device kind: the share of the bandwidth roofline and fixed costs.
    engine_efficiency: tuple[EngineEfficiency, ...] = DEFAULT_ENGINE_EFFICIENCY

    def efficiency(
        self, engine: EngineName, kind: DeviceKind, cpu_kernels: CpuKernels | None = None
    ) -> EngineEfficiency:
        """The entry for this engine on this kind of device: the one measured with the
        device's kernel variant if any, else the one for any variant."""
        entries = [e for e in self.engine_efficiency if e.engine == engine and e.kind == kind]
        for wanted in dict.fromkeys((cpu_kernels, None)):  # the device's variant, then any
            for entry in entries:
                if entry.cpu_kernels == wanted:
                    return entry
        return EngineEfficiency(
            engine=engine,
            kind=kind,
            bandwidth_fraction=self.bandwidth_efficiency,
            source="not calibrated: bandwidth_efficiency",
        )

    def overhead_bytes(self, kind: DeviceKind, engine: EngineName) -> int:
        if kind == "cpu" and engine == "torch":
            return self.overhead_torch_cpu_bytes
        return {
            "cuda": self.overhead_cuda_bytes,
            "metal": self.overhead_metal_bytes,
            "cpu": self.overhead_cpu_bytes,
        }[kind]


class ManualStage(Frozen):
    """One stage of a user-pinned split: layers [start_layer, end_layer) on one device."""

    device_id: DeviceId
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)


class PlacementRequest(Frozen):
    objective: Objective = "latency"
    # Tokens of KV cache reserved per request; None: min(model context, 4096).
    context_length: int | None = Field(default=None, gt=0)
    # Prompt length that the predicted time to first token refers to.
    reference_prompt_tokens: int = Field(default=512, gt=0)
    include_nodes: tuple[NodeId, ...] | None = None
    exclude_nodes: tuple[NodeId, ...] = ()
    include_devices: tuple[DeviceId, ...] | None = None
    exclude_devices: tuple[DeviceId, ...] = ()
    # Validate and cost this split instead of solving.
    manual_split: tuple[ManualStage, ...] | None = None
    # A named engine runs every stage and restricts placement to the device kinds it runs
    # on. None: torch on CUDA, MLX on Metal, `cpu_engine` on CPUs.
    engine: EngineName | None = None
    cpu_engine: EngineName = "torch"
    # Wall-clock budget for the whole call; None: sized to the cluster (docs/placement.md).
    time_limit_s: float | None = Field(default=None, gt=0)
    num_workers: int = Field(default=1, ge=1, le=8)
    params: CostParams = CostParams()


def engine_for(kind: DeviceKind, request: PlacementRequest) -> EngineName | None:
    """The engine a stage on a device of this kind runs (None: the named engine cannot)."""
    if request.engine is not None:
        return request.engine if kind in ENGINE_DEVICE_KINDS[request.engine] else None
    match kind:
        case "cuda":
            return "torch"
        case "metal":
            return "mlx"
        case "cpu":
            return request.cpu_engine


class MemoryUse(Frozen):
    # How the stage's engine holds the weights on this device ("as stored", "bfloat16",
    # "8-bit (stored 3-bit)", ...): `weights_bytes` counts them so, not as the checkpoint.
    weights_format: str
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    total_bytes: int
    free_bytes: int
    # What the device may use: free minus the safety margin.
    usable_bytes: int


class Stage(Frozen):
    """Layers [start_layer, end_layer) on one device, in pipeline order."""

    device_id: DeviceId
    node_id: NodeId
    device_name: str
    # The engine the stage was costed for (and runs with).
    engine: EngineName
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    # The first stage embeds tokens, the last computes logits and samples.
    holds_embedding: bool
    holds_head: bool
    decode_time_s: float
    prefill_time_s: float
    # Activation hand-off to the next stage (for the last stage: the token's return trip).
    handoff_s: float
    handoff_local: bool
    memory: MemoryUse

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer


class Prediction(Frozen):
    # One token of one stream: every stage, every hand-off, and the token's return.
    time_per_token_s: float
    tokens_per_s: float
    # Many streams in flight: the busiest stage or link sets the pace.
    bottleneck_s: float
    throughput_tokens_per_s: float
    ttft_s: float
    reference_prompt_tokens: int
    context_length: int


SolverStatus = Literal["optimal", "feasible", "heuristic", "baseline", "manual"]


class SolverReport(Frozen):
    # optimal/feasible: CP-SAT; heuristic: the greedy won or CP-SAT found nothing in time;
    # baseline: the memory-proportional split was at least as good; manual: a pinned split.
    status: SolverStatus
    solve_time_s: float
    time_limit_s: float
    # Proven lower bound on the objective (seconds), when CP-SAT ran.
    bound_s: float | None = None
    eligible_devices: int


class Placement(Frozen):
    model_id: ModelId
    objective: Objective
    stages: tuple[Stage, ...] = Field(min_length=1)
    prediction: Prediction
    solver: SolverReport

    @model_validator(mode="after")
    def _contiguous(self) -> "Placement":
        at = 0
        for stage in self.stages:
            if stage.start_layer != at or stage.end_layer <= stage.start_layer:
                raise ValueError("stages must cover the layers contiguously, in order")
            at = stage.end_layer
        return self

    def objective_s(self) -> float:
        p = self.prediction
        return p.time_per_token_s if self.objective == "latency" else p.bottleneck_s


class DeviceShortfall(Frozen):
    """Why one device takes no part, or holds less than the model needs of it."""

    device_id: DeviceId
    free_bytes: int
    # Layers it could hold as a middle stage at the requested context.
    max_layers: int
    # Bytes missing for its memory-proportional share of the model (0 when it has them).
    shortfall_bytes: int
    reason: str


ChangeKind = Literal["add_device", "reduce_context", "free_memory", "include_devices"]


class ClusterChange(Frozen):
    kind: ChangeKind
    description: str
    bytes: int | None = None
    context_length: int | None = None


class PlacementError(Frozen):
    reason: str
    devices: tuple[DeviceShortfall, ...] = ()
    # Model + KV + overheads minus what the eligible devices can hold (0: memory is not the issue).
    shortfall_bytes: int = 0
    # Smallest first: the least the user must change for the request to fit.
    changes: tuple[ClusterChange, ...] = ()


class PlacementPreview(Frozen):
    """What the preview endpoint returns: the best placement per objective and the baseline."""

    latency: Placement | PlacementError
    throughput: Placement | PlacementError
    baseline: Placement | None
