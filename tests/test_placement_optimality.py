"""The solver against an exhaustive search, and properties on random clusters.

The exhaustive search tries every ordered subset of devices and, for each, every layer
split (by dynamic programming over the split, which is exact for a fixed order). It shares
only the per-device cost terms with the solver, not the formulation.
"""

import math
import random
from itertools import pairwise, permutations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo.master.solver import baseline, place
from exo.master.solver.cost import Problem, compile_problem, stage_decode_s
from exo.master.solver.place import select_devices
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import Objective, Placement, PlacementError, PlacementRequest
from exo.shared.types.topology import ClusterView, DeviceKind
from tests.test_placement import card, check_valid, dev, links

KINDS: list[DeviceKind] = ["cuda", "metal", "cpu"]


def problem_of(model: ModelCard, cluster: ClusterView, request: PlacementRequest) -> Problem:
    selected = select_devices(cluster, request)
    assert not isinstance(selected, PlacementError)
    return compile_problem(model, cluster, selected[0], request)


def _best_split_cost(problem: Problem, order: tuple[int, ...], objective: Objective) -> float:
    """Exact best stage cost for this order: min-plus (latency) or min-max (throughput) DP."""
    n = problem.n_layers
    last = len(order) - 1
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    for k, d in enumerate(order):
        t = problem.devices[d]
        cap = t.max_layers_end if k in (0, last) else t.max_layers_middle
        nxt = np.full(n + 1, np.inf)
        for layers in range(1, min(cap, n) + 1):
            stage = stage_decode_s(problem, d, layers, last=k == last)
            shifted = best[: n + 1 - layers]
            cand = shifted + stage if objective == "latency" else np.maximum(shifted, stage)
            nxt[layers:] = np.minimum(nxt[layers:], cand)
        best = nxt
    return float(best[n])


def exhaustive(problem: Problem, objective: Objective) -> float:
    """The optimum of the objective over every ordered subset of devices and every split."""
    optimum = math.inf
    devices = range(len(problem.devices))
    for size in range(1, len(problem.devices) + 1):
        for order in permutations(devices, size):
            hops = [problem.handoff_s[a][b] for a, b in pairwise(order)]
            back = problem.return_s[order[-1]][order[0]]
            if back is None or any(h is None for h in hops):
                continue
            stages = _best_split_cost(problem, order, objective)
            if objective == "latency":
                value = stages + sum(h or 0.0 for h in hops) + back
            else:
                busy = [problem.occupancy_s[a][b] or 0.0 for a, b in pairwise(order)]
                value = max([stages, *busy])
            optimum = min(optimum, value)
    return optimum


def random_cluster(rng: random.Random, n_devices: int) -> ClusterView:
    nodes = [f"n{i}" for i in range(rng.randint(1, n_devices))]
    devices = tuple(
        dev(
            rng.choice(nodes),
            i,
            memory_gb=rng.choice([4, 8, 12, 16, 24, 48]),
            bandwidth_gbs=rng.choice([60, 100, 273, 320, 600, 936, 2000]),
            tflops=rng.choice([2, 20, 100]),
            kind=rng.choice(KINDS),
        )
        for i in range(n_devices)
    )
    used = sorted({d.node_id for d in devices})
    link_list = [
        link
        for link in links(
            used, latency_s=rng.choice([5e-6, 50e-6, 2e-3]), bandwidth=rng.choice([1.25e8, 1.25e9])
        )
        # Now and then a pair of nodes has no link at all.
        if rng.random() > 0.15
    ]
    return ClusterView(devices=devices, links=tuple(link_list))


def random_card(rng: random.Random, max_layers: int) -> ModelCard:
    layers = rng.randint(2, max_layers)
    total_gb = rng.choice([4, 10, 20, 40])
    return card(layers=layers, layer_gb=total_gb / layers, non_layer_gb=rng.choice([0.1, 0.5, 2.0]))


# Seeds chosen once; each case is a fixed cluster, so failures reproduce exactly.
CASES = [
    (seed, n_devices, max_layers)
    for seed in range(6)
    for n_devices, max_layers in ((3, 40), (4, 24), (5, 40))
]


@pytest.mark.parametrize(("seed", "n_devices", "max_layers"), CASES)
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_solver_matches_exhaustive_search(
    seed: int, n_devices: int, max_layers: int, objective: Objective
) -> None:
    rng = random.Random(seed * 100 + n_devices)
    model = random_card(rng, max_layers)
    cluster = random_cluster(rng, n_devices)
    # A generous limit: this checks the formulation, not the clock.
    request = PlacementRequest(objective=objective, time_limit_s=20.0)
    optimum = exhaustive(problem_of(model, cluster, request), objective)
    result = place(model, cluster, request)
    if math.isinf(optimum):
        assert isinstance(result, PlacementError)
        return
    assert isinstance(result, Placement), result
    check_valid(result, model)
    # Costs are integer nanoseconds inside CP-SAT: allow that rounding, nothing more.
    assert result.objective_s() == pytest.approx(optimum, rel=1e-6, abs=1e-7)
    assert result.solver.status in ("optimal", "heuristic", "baseline")


def test_exhaustive_optimum_written_down() -> None:
    """A case small enough to check by hand.

    Two nodes, one device each, 10 layers of 1 GB, no embedding bytes. Device a reads
    0.8 x 1000 GB/s = 800 GB/s, b 0.8 x 500 = 400 GB/s; each holds at most 6 layers.
    Latency: 6 on a + 4 on b = 6 x 1.25 ms + 4 x 2.5 ms = 17.5 ms, plus two trips of
    10 us (device-host copies) + 100 us (link) + bytes at 10 GB/s (host copy is the narrowest).
    The head reads no bytes (none outside the layers) and decode has no compute term.
    Throughput: 6 on a (7.5 ms) and 4 on b (10 ms); 7/3 does not fit.
    """
    model = card(layers=10, layer_gb=1.0, non_layer_gb=0.0).model_copy(
        update={"kv_bytes_per_token_per_layer": 1}
    )
    cluster = ClusterView(
        devices=(dev("a", 0, 7.2, 1000), dev("b", 0, 7.2, 500)),
        links=links(["a", "b"], 100e-6, 1e12),
    )
    request = PlacementRequest(reference_prompt_tokens=1, context_length=1)
    lat = place(model, cluster, request)
    assert isinstance(lat, Placement)
    assert [s.n_layers for s in lat.stages] == [6, 4]
    trips = 2 * 110e-6 + (2 * model.hidden_size + 64) / 10e9
    assert lat.prediction.time_per_token_s == pytest.approx(17.5e-3 + trips, rel=1e-9)
    thr = place(model, cluster, request.model_copy(update={"objective": "throughput"}))
    assert isinstance(thr, Placement)
    # No head cost: either order gives the same bottleneck and the same single stream.
    assert sorted((s.node_id, s.n_layers) for s in thr.stages) == [("a", 6), ("b", 4)]
    assert thr.prediction.bottleneck_s == pytest.approx(10e-3, rel=1e-4)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10**6),
    n_devices=st.integers(1, 9),
    objective=st.sampled_from(["latency", "throughput"]),
)
def test_random_clusters_valid_and_never_worse_than_baseline(
    seed: int, n_devices: int, objective: Objective
) -> None:
    rng = random.Random(seed)
    model = random_card(rng, 80)
    cluster = random_cluster(rng, n_devices)
    request = PlacementRequest(objective=objective, context_length=rng.choice([512, 4096, 32768]))
    result = place(model, cluster, request)
    base = baseline(model, cluster, request)
    if isinstance(result, PlacementError):
        assert base is None
        assert result.reason
        return
    check_valid(result, model)
    if base is not None:
        check_valid(base, model)
        assert result.objective_s() <= base.objective_s() * (1 + 1e-12)
