"""The cost model per engine: efficiency factors, fixed costs, engine choice per device."""

import pytest

from exo.master.solver import place
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.shared.types.placement import (
    CostParams,
    EngineEfficiency,
    Placement,
    PlacementError,
    PlacementRequest,
    engine_for,
)
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
    layer = (CARD.bytes_per_layer + CARD.kv_bytes_per_token_per_layer * 100) / (bandwidth * 0.5)
    head = min(CARD.bytes_non_layer, CARD.vocab_size * CARD.hidden_size * 0.625) / (bandwidth * 0.5)
    # No compute term in decode: a 1 GFLOP/s compute figure changes nothing.
    expected = 2e-3 + CARD.n_layers * (layer + 1e-4) + head
    assert result.prediction.time_per_token_s == pytest.approx(expected, rel=1e-12)
    assert stage.decode_time_s == pytest.approx(expected, rel=1e-12)


def test_an_uncalibrated_pair_uses_the_global_bandwidth_efficiency() -> None:
    params = CostParams(engine_efficiency=())
    assert params.efficiency("torch", "cuda").bandwidth_fraction == params.bandwidth_efficiency
    assert params.efficiency("torch", "cuda").token_overhead_s == 0.0


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
