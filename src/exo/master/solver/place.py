"""The master's placement: `place(card, cluster, request)`, a pure function of its inputs.

Order of work: filter devices, compile costs, build the greedy warm start and the
memory-proportional baseline, run CP-SAT under a wall-clock limit, and return the best
of the three. The solver's answer is therefore never worse than either heuristic.
"""

import time

from exo.master.solver import cpsat
from exo.master.solver.cost import Problem, Split, compile_problem, fits, objective_s
from exo.master.solver.explain import excluded, infeasible, manual_split
from exo.master.solver.heuristics import bandwidth_greedy, better, memory_proportional
from exo.master.solver.report import to_placement
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import (
    DeviceShortfall,
    Placement,
    PlacementError,
    PlacementPreview,
    PlacementRequest,
    SolverStatus,
    engine_for,
)
from exo.shared.types.topology import ClusterView, DeviceProfile


def default_time_limit_s(n_devices: int) -> float:
    """The whole call's wall-clock budget: 200 ms up to 16 devices, rising to 2 s at 64."""
    if n_devices <= 16:
        return 0.2
    return min(2.0, 0.2 + 0.0375 * (n_devices - 16))


def select_devices(
    cluster: ClusterView, request: PlacementRequest
) -> tuple[tuple[DeviceProfile, ...], tuple[DeviceShortfall, ...]] | PlacementError:
    """The devices the request allows, and the ones it leaves out (for explanations)."""
    nodes = {d.node_id for d in cluster.devices}
    ids = {d.device_id for d in cluster.devices}
    unknown = [n for n in request.include_nodes or () if n not in nodes]
    unknown += [d for d in request.include_devices or () if d not in ids]
    if unknown:
        return PlacementError(reason=f"include lists name unknown nodes or devices: {unknown}")
    chosen: list[DeviceProfile] = []
    left: list[DeviceProfile] = []
    unrunnable: list[DeviceProfile] = []
    for d in cluster.devices:
        allowed = (
            (request.include_nodes is None or d.node_id in request.include_nodes)
            and (request.include_devices is None or d.device_id in request.include_devices)
            and d.node_id not in request.exclude_nodes
            and d.device_id not in request.exclude_devices
        )
        if not allowed:
            left.append(d)
        elif engine_for(d.kind, request) is None:
            unrunnable.append(d)
        else:
            chosen.append(d)
    # A canonical order: the answer must not depend on the order telemetry listed devices in.
    chosen.sort(key=lambda d: (d.node_id, d.device_id))
    reasons = excluded(tuple(left), "excluded by the request")
    if unrunnable:
        reasons += excluded(tuple(unrunnable), f"engine {request.engine} does not run on it")
    return tuple(chosen), reasons


def _problem(
    card: ModelCard, cluster: ClusterView, request: PlacementRequest
) -> tuple[Problem, tuple[DeviceShortfall, ...]] | PlacementError:
    selected = select_devices(cluster, request)
    if isinstance(selected, PlacementError):
        return selected
    devices, left_out = selected
    return compile_problem(card, cluster, devices, request), left_out


def place(
    card: ModelCard, cluster: ClusterView, request: PlacementRequest | None = None
) -> Placement | PlacementError:
    started = time.perf_counter()
    request = request or PlacementRequest()
    compiled = _problem(card, cluster, request)
    if isinstance(compiled, PlacementError):
        return compiled
    problem, left_out = compiled
    limit = request.time_limit_s or default_time_limit_s(len(problem.devices))
    if request.manual_split is not None:
        split = manual_split(problem, request.manual_split)
        if isinstance(split, PlacementError):
            return split
        return to_placement(problem, split, "manual", time.perf_counter() - started, limit)
    greedy = bandwidth_greedy(problem)
    base = memory_proportional(problem)
    # Ties go to the earlier entry: the solver, then the greedy, then the baseline.
    candidates: list[tuple[Split, SolverStatus]] = []
    warm = better(problem, greedy, base)
    bound = None
    proven = False
    if problem.devices:
        # CP-SAT stops a little after its limit: keep a margin inside the caller's budget.
        outcome = cpsat.solve(problem, warm, started + limit * 0.85)
        bound = outcome.bound_s
        proven = outcome.status == "optimal" and outcome.split is not None
        if outcome.split is not None and fits(problem, outcome.split):
            status: SolverStatus = "optimal" if outcome.status == "optimal" else "feasible"
            candidates.append((outcome.split, status))
    if greedy is not None:
        candidates.append((greedy, "heuristic"))
    if base is not None:
        candidates.append((base, "baseline"))
    if not candidates:
        return infeasible(problem, left_out)
    split, status = min(candidates, key=lambda c: objective_s(problem, c[0]))
    if proven:
        # CP-SAT proved its answer optimal (to the nanosecond); a heuristic that still wins
        # differs from it only by that rounding, so it is optimal too.
        status = "optimal"
    return to_placement(problem, split, status, time.perf_counter() - started, limit, bound)


def baseline(
    card: ModelCard, cluster: ClusterView, request: PlacementRequest | None = None
) -> Placement | None:
    """The memory-proportional split (what exo and llama.cpp RPC do), costed the same way."""
    started = time.perf_counter()
    request = request or PlacementRequest()
    compiled = _problem(card, cluster, request)
    if isinstance(compiled, PlacementError):
        return None
    problem, _ = compiled
    split = memory_proportional(problem)
    if split is None:
        return None
    return to_placement(problem, split, "baseline", time.perf_counter() - started, 0.0)


def preview(
    card: ModelCard, cluster: ClusterView, request: PlacementRequest | None = None
) -> PlacementPreview:
    """The best placement for each objective, and the baseline, for the preview endpoint."""
    request = request or PlacementRequest()
    return PlacementPreview(
        latency=place(card, cluster, request.model_copy(update={"objective": "latency"})),
        throughput=place(card, cluster, request.model_copy(update={"objective": "throughput"})),
        baseline=baseline(card, cluster, request),
    )
