"""The CP-SAT formulation: a circuit through the chosen devices, and a layer count per device.

Why it is fast: layer ranges follow from the route and the counts (a stage starts where its
predecessor ends), so the model needs no position or start-layer variables and no big-M
ordering. Which devices take part and in what order is one AddCircuit constraint over
arc literals (a depot closes the ring: depot -> first stage, last stage -> depot), which
CP-SAT propagates and relaxes well. Costs are integers in nanoseconds.
"""

import time
from itertools import pairwise

from exo.master.solver.cost import DeviceTerms, Problem, Split
from exo.master.solver.ortools_adapter import LinearModel, Solution, SolveStatus, Terms
from exo.shared.types.base import Frozen

NS = 1e9
DEPOT = 0
# Above this many devices presolve costs most of the budget and the search does better without it.
PRESOLVE_MAX_DEVICES = 24


def _ns(seconds: float) -> int:
    return round(seconds * NS)


class Outcome(Frozen):
    split: Split | None
    status: SolveStatus
    # The proven lower bound on the objective, in seconds.
    bound_s: float | None
    wall_s: float


class _Vars(Frozen):
    layers: tuple[int, ...]
    active: tuple[int, ...]
    skip: tuple[int, ...]
    first: tuple[int, ...]
    last: tuple[int, ...]
    end: tuple[int, ...]
    arcs: tuple[tuple[int, int, int], ...]
    ret: int


def _variables(problem: Problem, m: LinearModel) -> _Vars:
    devs = range(len(problem.devices))
    layers = tuple(
        m.new_int(0, t.max_layers_middle, f"n{d}") for d, t in enumerate(problem.devices)
    )
    active = tuple(m.new_bool(f"act{d}") for d in devs)
    skip = tuple(m.new_bool(f"skip{d}") for d in devs)
    first = tuple(m.new_bool(f"first{d}") for d in devs)
    last = tuple(m.new_bool(f"last{d}") for d in devs)
    end = tuple(m.new_bool(f"end{d}") for d in devs)
    arcs = tuple(
        (i, j, m.new_bool(f"x{i}_{j}"))
        for i in devs
        for j in devs
        if i != j and problem.handoff_s[i][j] is not None
    )
    worst = max((r for row in problem.return_s for r in row if r is not None), default=0.0)
    return _Vars(
        layers=layers,
        active=active,
        skip=skip,
        first=first,
        last=last,
        end=end,
        arcs=arcs,
        ret=m.new_int(0, _ns(worst), "ret"),
    )


def _constraints(problem: Problem, m: LinearModel, v: _Vars) -> None:
    circuit: list[tuple[int, int, int]] = []
    for d, terms in enumerate(problem.devices):
        node = d + 1
        circuit += [(DEPOT, node, v.first[d]), (node, DEPOT, v.last[d]), (node, node, v.skip[d])]
        m.add_eq([(1, v.active[d]), (1, v.skip[d])], 1)
        # Taking part means at least one layer; memory caps the count.
        m.add_ge([(1, v.layers[d]), (-1, v.active[d])], 0)
        m.add_le([(1, v.layers[d]), (-terms.max_layers_middle, v.active[d])], 0)
        # end = first or last: the device then also holds the embedding / output head.
        m.add_ge([(1, v.end[d]), (-1, v.first[d])], 0)
        m.add_ge([(1, v.end[d]), (-1, v.last[d])], 0)
        m.add_le([(1, v.end[d]), (-1, v.first[d]), (-1, v.last[d])], 0)
        if terms.max_layers_end < 1:
            m.add_eq([(1, v.end[d])], 0)
        else:
            less = terms.max_layers_middle - terms.max_layers_end
            m.add_le([(1, v.layers[d]), (less, v.end[d])], terms.max_layers_middle)
    circuit += [(i + 1, j + 1, x) for i, j, x in v.arcs]
    m.add_circuit(circuit)
    m.add_eq([(1, n) for n in v.layers], problem.n_layers)
    # Implied by the circuit, stated for the LP: one hand-off fewer than stages, and at least
    # as many stages as it takes the roomiest devices to hold every layer.
    m.add_eq([(1, x) for _, _, x in v.arcs] + [(-1, a) for a in v.active], -1)
    m.add_ge([(1, a) for a in v.active], _fewest_stages(problem))
    _return_trip(problem, m, v)
    _break_symmetry(problem, m, v)


def _fewest_stages(problem: Problem) -> int:
    caps = sorted((t.max_layers_middle for t in problem.devices), reverse=True)
    held = 0
    for k, cap in enumerate(caps, start=1):
        held += cap
        if held >= problem.n_layers:
            return k
    return 1


def _return_trip(problem: Problem, m: LinearModel, v: _Vars) -> None:
    """ret >= the token's trip from the last stage back to the first, without pair literals.

    Across nodes the trip depends only on the node pair: ret >= cost * (last on a + first on b - 1).
    """
    nodes: dict[str, list[int]] = {}
    for d, t in enumerate(problem.devices):
        nodes.setdefault(t.device.node_id, []).append(d)
    for a, on_a in nodes.items():
        for b, on_b in nodes.items():
            pairs = (
                [(i, j) for i in on_a for j in on_b if i != j] if a == b else [(on_a[0], on_b[0])]
            )
            for i, j in pairs:
                lasts = [v.last[i]] if a == b else [v.last[k] for k in on_a]
                firsts = [v.first[j]] if a == b else [v.first[k] for k in on_b]
                trip = problem.return_s[i][j]
                if trip is None:
                    m.add_le([(1, x) for x in lasts + firsts], 1)
                elif _ns(trip) > 0:
                    cost = _ns(trip)
                    m.add_ge([(1, v.ret), *[(-cost, x) for x in lasts + firsts]], -cost)


def _twin_key(problem: Problem, d: int) -> tuple[object, ...]:
    dev = problem.devices[d].device
    return (
        dev.node_id,
        dev.name,
        dev.kind,
        dev.memory_free_bytes,
        dev.memory_bandwidth_bytes_per_s,
        dev.compute_flops,
    )


def _break_symmetry(problem: Problem, m: LinearModel, v: _Vars) -> None:
    """Identical devices on one node are interchangeable: the earlier one takes at least as many layers."""
    seen: dict[tuple[object, ...], int] = {}
    for d in range(len(problem.devices)):
        key = _twin_key(problem, d)
        if key in seen:
            m.add_ge([(1, v.layers[seen[key]]), (-1, v.layers[d])], 0)
        seen[key] = d


def canonical(problem: Problem, split: Split) -> Split:
    """The same pipeline with twins relabelled so that it obeys the symmetry breaking (a valid hint)."""
    twins: dict[tuple[object, ...], list[int]] = {}
    for d in range(len(problem.devices)):
        twins.setdefault(_twin_key(problem, d), []).append(d)
    devices = [d for d, _ in split]
    for group in twins.values():
        used = sorted(
            (k for k, d in enumerate(devices) if d in group), key=lambda k: (-split[k][1], k)
        )
        for k, d in zip(used, group, strict=False):
            devices[k] = d
    return tuple((d, n) for d, (_, n) in zip(devices, split, strict=True))


def _latency_terms(problem: Problem, v: _Vars) -> list[tuple[int, int]]:
    terms: list[tuple[int, int]] = []
    for d, t in enumerate(problem.devices):
        terms += _stage_terms(t, v, d)
    terms += [(_ns(problem.handoff_s[i][j] or 0.0), x) for i, j, x in v.arcs]
    return [*terms, (1, v.ret)]


def _stage_terms(t: DeviceTerms, v: _Vars, d: int) -> Terms:
    """A stage's time per token: its layers, the head when last, its fixed cost when active."""
    return [
        (_ns(t.layer_decode_s), v.layers[d]),
        (_ns(t.head_decode_s), v.last[d]),
        (_ns(t.stage_overhead_s), v.active[d]),
    ]


def _bottleneck(problem: Problem, m: LinearModel, v: _Vars) -> int:
    top = sum(
        _ns(t.layer_decode_s) * t.max_layers_middle + _ns(t.head_decode_s) + _ns(t.stage_overhead_s)
        for t in problem.devices
    )
    neck = m.new_int(_stage_lower_bound(problem), max(top, 1), "bottleneck")
    for d, t in enumerate(problem.devices):
        m.add_ge([(1, neck), *[(-c, x) for c, x in _stage_terms(t, v, d)]], 0)
    for i, j, x in v.arcs:
        m.add_ge([(1, neck), (-_ns(problem.occupancy_s[i][j] or 0.0), x)], 0)
    return neck


def _stage_lower_bound(problem: Problem) -> int:
    """Smallest bound whose per-device counts could hold every layer, heads and ends ignored."""
    cost = [_ns(t.layer_decode_s) for t in problem.devices]
    if min(cost, default=0) < 1:
        return 0
    caps = [t.max_layers_middle for t in problem.devices]

    def enough(bound: int) -> bool:
        return sum(min(c, bound // k) for c, k in zip(caps, cost, strict=True)) >= problem.n_layers

    levels = sorted({n * k for c, k in zip(caps, cost, strict=True) for n in range(1, c + 1)})
    if not levels or not enough(levels[-1]):
        return 0
    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(levels[mid]) else (mid + 1, hi)
    return levels[lo]


def _hint(problem: Problem, v: _Vars, split: Split) -> dict[int, int]:
    count = dict(split)
    order = [d for d, _ in split]
    succ = dict(pairwise(order))
    values: dict[int, int] = {}
    for d in range(len(problem.devices)):
        on = d in count
        values |= {v.layers[d]: count.get(d, 0), v.active[d]: int(on), v.skip[d]: int(not on)}
        values |= {v.first[d]: int(d == order[0]), v.last[d]: int(d == order[-1])}
        values[v.end[d]] = int(d in (order[0], order[-1]))
    for i, j, x in v.arcs:
        values[x] = int(succ.get(i) == j)
    values[v.ret] = _ns(problem.return_s[order[-1]][order[0]] or 0.0)
    return values


def _decode(problem: Problem, v: _Vars, sol: Solution) -> Split:
    succ = {i: j for i, j, x in v.arcs if sol.values[x]}
    at = next(d for d in range(len(problem.devices)) if sol.values[v.first[d]])
    split: list[tuple[int, int]] = []
    while True:
        split.append((at, sol.values[v.layers[at]]))
        if at not in succ:
            return tuple(split)
        at = succ[at]


def solve(problem: Problem, warm_start: Split | None, deadline: float) -> Outcome:
    """Optimise the request's objective by `deadline` (a perf_counter time); for throughput,
    then the single-stream latency at that bottleneck."""
    started = time.perf_counter()
    m = LinearModel()
    v = _variables(problem, m)
    _constraints(problem, m, v)
    workers = problem.request.num_workers
    presolve = len(problem.devices) <= PRESOLVE_MAX_DEVICES
    latency = _latency_terms(problem, v)
    hint = {} if warm_start is None else _hint(problem, v, canonical(problem, warm_start))
    if problem.request.objective == "latency":
        m.hint(hint)
        m.minimize(latency)
        sol = m.solve(_left(deadline), workers, presolve)
        return _outcome(problem, v, sol, sol, started)
    neck = _bottleneck(problem, m, v)
    if hint:
        hint[neck] = _hinted_bottleneck(problem, v, hint)
    m.hint(hint)
    m.minimize([(1, neck)])
    first = m.solve(_left(deadline), workers, presolve)
    if first.objective is None or _left(deadline) <= 0.01:
        return _outcome(problem, v, first, first, started)
    # Second pass: keep the bottleneck, shorten the single stream (start from the first answer).
    m.add_le([(1, neck)], first.objective)
    m.minimize(latency)
    m.hint(dict(enumerate(first.values)))
    second = m.solve(_left(deadline), workers, presolve)
    return _outcome(problem, v, first, second if second.objective is not None else first, started)


def _left(deadline: float) -> float:
    return max(0.005, deadline - time.perf_counter())


def _hinted_bottleneck(problem: Problem, v: _Vars, hint: dict[int, int]) -> int:
    stages = [
        sum(c * hint[x] for c, x in _stage_terms(t, v, d)) for d, t in enumerate(problem.devices)
    ]
    links = [_ns(problem.occupancy_s[i][j] or 0.0) * hint[x] for i, j, x in v.arcs]
    return max([_stage_lower_bound(problem), *stages, *links])


def _outcome(
    problem: Problem, v: _Vars, primary: Solution, final: Solution, started: float
) -> Outcome:
    wall = time.perf_counter() - started
    if final.objective is None:
        return Outcome(split=None, status=primary.status, bound_s=None, wall_s=wall)
    bound = None if primary.bound is None else primary.bound / NS
    return Outcome(
        split=_decode(problem, v, final), status=primary.status, bound_s=bound, wall_s=wall
    )
