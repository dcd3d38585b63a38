"""The cost model per engine: efficiency factors, fixed costs, engine choice per device."""

import pytest

from exo.master.solver import place
from exo.master.solver.cost import holding
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import (
    CostParams,
    EngineEfficiency,
    Placement,
    PlacementError,
    PlacementRequest,
    engine_for,
)
from exo.shared.types.telemetry import CpuKernels
from exo.shared.types.topology import ClusterView
from tests.test_placement import card, dev, links

CARD = SMOLLM2_135M_INSTRUCT


def test_engines_per_device_kind() -> None:
    default = PlacementRequest()
    assert [engine_for(k, default) for k in ("cuda", "metal", "cpu")] == ["torch", "mlx", "torch"]
    mlx_cpus = PlacementRequest(cpu_engine="mlx")
    assert engine_for("cpu", mlx_cpus) == "mlx"
    named = PlacementRequest(engine="mlx")
    assert [engine_for(k, named) for k in ("cuda", "metal", "cpu")] == [None, "mlx", "mlx"]


def test_decode_time_is_the_calibrated_bandwidth_share_plus_fixed_costs() -> None:
    eff = EngineEfficiency(
        engine="torch", kind="cpu", bandwidth_fraction=0.5, layer_overhead_s=1e-4,
        token_overhead_s=2e-3,
    )  # fmt: skip
    params = CostParams(engine_efficiency=(eff,))
    request = PlacementRequest(reference_prompt_tokens=100, params=params)
    bandwidth = 20e9
    cluster = ClusterView(devices=(dev("a", 0, 8, bandwidth / 1e9, tflops=0.001, kind="cpu"),))
    result = place(CARD, cluster, request)
    assert isinstance(result, Placement)
    (stage,) = result.stages
    assert stage.engine == "torch"
    # torch on CPU holds 4-bit weights as stored and the KV cache in float32 (twice the
    # card's float16).
    kv = 2 * CARD.kv_bytes_per_token_per_layer
    layer = (CARD.bytes_per_layer + kv * 100) / (bandwidth * 0.5)
    head = min(CARD.bytes_non_layer, CARD.vocab_size * CARD.hidden_size * 0.625) / (bandwidth * 0.5)
    # No compute term in decode: a 1 GFLOP/s compute figure changes nothing.
    expected = 2e-3 + CARD.n_layers * (layer + 1e-4) + head
    assert result.prediction.time_per_token_s == pytest.approx(expected, rel=1e-12)
    assert stage.decode_time_s == pytest.approx(expected, rel=1e-12)


def test_an_uncalibrated_pair_uses_the_global_bandwidth_efficiency() -> None:
    params = CostParams(engine_efficiency=())
    assert params.efficiency("torch", "cuda").bandwidth_fraction == params.bandwidth_efficiency
    assert params.efficiency("torch", "cuda").token_overhead_s == 0.0


def test_a_cpu_is_costed_by_the_kernel_variant_it_runs() -> None:
    """Our AVX2 kernels decode at the AVX-512 entry's bandwidth share but prefill at about
    a third of its rate; a CPU of unknown variant gets the entry for any."""
    params = CostParams()
    generic = params.efficiency("torch", "cpu")
    assert generic.cpu_kernels is None
    assert params.efficiency("torch", "cpu", "avx512-vnni") == generic
    assert params.efficiency("torch", "cpu", "none") == generic
    avx2 = params.efficiency("torch", "cpu", "avx2")
    assert avx2.cpu_kernels == "avx2" and avx2.compute_fraction == 0.55
    assert params.efficiency("mlx", "cpu", "avx2").engine == "mlx"  # no entry of its own

    def predicted(variant: CpuKernels | None) -> Placement:
        cpu = dev("a", 0, 8, 16.0, tflops=0.18, kind="cpu")
        result = place(
            CARD, ClusterView(devices=(cpu.model_copy(update={"cpu_kernels": variant}),))
        )
        assert isinstance(result, Placement)
        return result

    vnni, slow = predicted("avx512-vnni"), predicted("avx2")
    assert slow.prediction.time_per_token_s == pytest.approx(vnni.prediction.time_per_token_s)
    assert slow.stages[0].prefill_time_s > 2.5 * vnni.stages[0].prefill_time_s
    assert predicted(None).stages[0].prefill_time_s == vnni.stages[0].prefill_time_s


def test_a_stage_overhead_keeps_a_model_that_fits_on_one_device() -> None:
    """Two equal devices: a split halves nothing but adds a stage's fixed cost and a hop."""
    eff = EngineEfficiency(
        engine="torch", kind="cuda", bandwidth_fraction=0.8, token_overhead_s=1e-3
    )
    request = PlacementRequest(params=CostParams(engine_efficiency=(eff,)))
    model = card(layers=32, layer_gb=0.2, non_layer_gb=0.5)
    cluster = ClusterView(
        devices=(dev("a", 0, 24, 900), dev("b", 0, 24, 900)), links=links(["a", "b"])
    )
    lat = place(model, cluster, request)
    assert isinstance(lat, Placement) and len(lat.stages) == 1
    # Throughput pays each stage's overhead once per token too, and still splits.
    thr = place(model, cluster, request.model_copy(update={"objective": "throughput"}))
    assert isinstance(thr, Placement) and len(thr.stages) == 2
    per_stage = [s.decode_time_s for s in thr.stages]
    assert thr.prediction.bottleneck_s == pytest.approx(max(per_stage))
    assert min(per_stage) > 1e-3


def test_a_named_engine_leaves_out_the_devices_it_does_not_run_on() -> None:
    cluster = ClusterView(
        devices=(dev("a", 0, 24, 900, kind="cuda"), dev("b", 0, 24, 400, kind="metal")),
        links=links(["a", "b"]),
    )
    model = card(layers=32, layer_gb=0.2, non_layer_gb=0.5)
    mlx = place(model, cluster, PlacementRequest(engine="mlx"))
    assert isinstance(mlx, Placement)
    assert [(s.device_id, s.engine) for s in mlx.stages] == [("b/metal:0", "mlx")]
    only_cuda = ClusterView(devices=cluster.devices[:1])
    refused = place(model, only_cuda, PlacementRequest(engine="mlx"))
    assert isinstance(refused, PlacementError)
    assert [d.reason for d in refused.devices] == ["engine mlx does not run on it"]


def _quantized(bits: int, group: int = 64) -> ModelCard:
    # 32 layers of 0.45 GB stored: a ~8B-parameter-class model at `bits` bits.
    return card(layers=32, layer_gb=0.45, non_layer_gb=0.6, hidden=4096).model_copy(
        update={"dtype": f"q{bits}_affine_g{group}", "vocab_size": 32000}
    )


def test_each_engine_is_charged_for_the_weights_as_it_holds_them() -> None:
    q4 = _quantized(4)
    stored = 4 / 8 + 4 / 64
    kv = q4.kv_bytes_per_token_per_layer
    mlx = holding(q4, "mlx", "metal")
    assert (mlx.layer_bytes, mlx.non_layer_bytes, mlx.kv_bytes_per_token_per_layer) == (
        q4.bytes_per_layer,
        q4.bytes_non_layer,
        kv,
    )
    assert holding(q4, "mlx", "cpu") == mlx
    # torch on CUDA dequantizes to bfloat16: 2 bytes a weight against 0.5625 stored.
    cuda = holding(q4, "torch", "cuda")
    assert cuda.weights == "bfloat16"
    assert cuda.layer_bytes == pytest.approx(q4.bytes_per_layer * 2 / stored, abs=1)
    assert cuda.non_layer_bytes == pytest.approx(q4.bytes_non_layer * 2 / stored, abs=1)
    assert cuda.kv_bytes_per_token_per_layer == kv
    # torch on CPU: 4-bit as stored, the KV cache in float32.
    cpu = holding(q4, "torch", "cpu")
    assert (cpu.weights, cpu.layer_bytes) == ("as stored", q4.bytes_per_layer)
    assert cpu.kv_bytes_per_token_per_layer == 2 * kv
    # 3-bit values are held as bytes on CPU.
    q3 = _quantized(3)
    cpu3 = holding(q3, "torch", "cpu")
    assert cpu3.weights == "8-bit (stored 3-bit)"
    assert cpu3.layer_bytes == pytest.approx(
        q3.bytes_per_layer * (1 + 4 / 64) / (3 / 8 + 4 / 64), abs=1
    )
    # A dense checkpoint is quantized to 4-bit on CPU; its embedding is held in float32.
    bf16 = q4.model_copy(update={"dtype": "bfloat16"})
    dense = holding(bf16, "torch", "cpu")
    assert dense.layer_bytes == pytest.approx(bf16.bytes_per_layer * 0.625 / 2, abs=1)
    assert dense.non_layer_bytes == 2 * bf16.bytes_non_layer
    assert holding(bf16, "torch", "cuda").layer_bytes == bf16.bytes_per_layer


def test_a_4bit_model_is_placed_on_a_gpu_at_its_bfloat16_size() -> None:
    # 14.4 GB stored would fit a 24 GB GPU; in bfloat16 (~51 GB) it does not.
    q4 = _quantized(4)
    gpu = dev("pc", 0, 24, 1008, 165)
    gpu_layer = holding(q4, "torch", "cuda").layer_bytes
    # Alone, the GPU is refused, short by what bfloat16 needs beyond its memory.
    alone = place(q4, ClusterView(devices=(gpu,)))
    assert isinstance(alone, PlacementError)
    assert "does not fit" in alone.reason and "hold 12 of 32" in alone.reason
    assert alone.shortfall_bytes > 20 * 10**9
    # Beside a 64 GB Mac (MLX holds it as stored), the Mac takes every layer: it reads
    # 0.45 GB a layer at 400 GB/s, the GPU 1.6 GB at 1008 GB/s.
    mac = dev("mac", 0, 64, 400, 27, kind="metal")
    both = place(q4, ClusterView(devices=(gpu, mac), links=links(["pc", "mac"])))
    assert isinstance(both, Placement), both
    assert [(s.device_id, s.n_layers) for s in both.stages] == [("mac/metal:0", 32)]
    assert both.stages[0].memory.weights_format == "as stored"
    # A Mac too small for all of it: the GPU holds what fits in bfloat16, no more.
    small_mac = dev("mac", 0, 12, 400, 27, kind="metal")
    split = place(q4, ClusterView(devices=(gpu, small_mac), links=links(["pc", "mac"])))
    assert isinstance(split, Placement), split
    assert sum(s.n_layers for s in split.stages) == 32 and len(split.stages) == 2
    (on_gpu,) = [s for s in split.stages if s.device_id == gpu.device_id]
    assert on_gpu.memory.weights_format == "bfloat16"
    assert on_gpu.memory.weights_bytes >= on_gpu.n_layers * gpu_layer
    assert 0 < on_gpu.n_layers <= 12
    for stage in split.stages:
        assert stage.memory.total_bytes <= stage.memory.usable_bytes
