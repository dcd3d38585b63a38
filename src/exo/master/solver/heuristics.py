"""Fast splits without a solver: the bandwidth-greedy warm start and the memory-proportional baseline.

For a fixed order in which every device takes part, `split_for_order` is exact: latency is
linear in each stage's layer count (fill the fastest devices first), and the bottleneck is
minimised by the smallest stage-time bound whose per-device layer counts still add up.
"""

import math
from collections.abc import Iterable

from exo.master.solver.cost import Problem, Split, fits, max_layers, objective_s


def route(problem: Problem, chosen: Iterable[int]) -> tuple[int, ...]:
    """Devices of one node side by side (a local copy beats a network hop), nodes by nearest hop."""
    by_node: dict[str, list[int]] = {}
    for d in sorted(chosen, key=lambda d: (problem.devices[d].layer_decode_s, d)):
        by_node.setdefault(problem.devices[d].device.node_id, []).append(d)
    if not by_node:
        return ()
    nodes = list(by_node)
    order = [nodes.pop(0)]
    while nodes:
        tail = by_node[order[-1]][-1]
        nodes.sort(key=lambda n: (_hop(problem, tail, by_node[n][0]), n))
        order.append(nodes.pop(0))
    flat = [d for n in order for d in by_node[n]]
    # The ends also hold the embedding and head: put the roomiest device of each end node there.
    head_node, tail_node = by_node[order[0]], by_node[order[-1]]
    first = max(head_node, key=lambda d: problem.devices[d].max_layers_end)
    flat.remove(first)
    flat.insert(0, first)
    if len(flat) > 1:
        candidates = [d for d in tail_node if d != first] or [flat[-1]]
        last = max(candidates, key=lambda d: problem.devices[d].max_layers_end)
        flat.remove(last)
        flat.append(last)
    return tuple(flat)


def _hop(problem: Problem, a: int, b: int) -> float:
    hop = problem.handoff_s[a][b]
    return math.inf if hop is None else hop


def _caps(problem: Problem, order: tuple[int, ...]) -> list[int]:
    last = len(order) - 1
    return [max_layers(problem, d, end=k in (0, last)) for k, d in enumerate(order)]


def split_for_order(problem: Problem, order: tuple[int, ...]) -> Split | None:
    """The best layer counts when exactly these devices take part, in this order."""
    if not order:
        return None
    caps = _caps(problem, order)
    if min(caps) < 1 or sum(caps) < problem.n_layers:
        return None
    if problem.request.objective == "latency":
        counts = _fill_fastest(problem, order, caps)
    else:
        counts = _level_bottleneck(problem, order, caps)
    split = tuple(zip(order, counts, strict=True))
    return split if fits(problem, split) else None


def _fill_fastest(problem: Problem, order: tuple[int, ...], caps: list[int]) -> list[int]:
    counts = [1] * len(order)
    left = problem.n_layers - len(order)
    for k in sorted(range(len(order)), key=lambda k: problem.devices[order[k]].layer_decode_s):
        take = min(left, caps[k] - 1)
        counts[k] += take
        left -= take
    return counts


def _level_bottleneck(problem: Problem, order: tuple[int, ...], caps: list[int]) -> list[int]:
    last = len(order) - 1
    cost = [problem.devices[d].layer_decode_s for d in order]
    # Each stage's fixed part: its per-token overhead, and the output head on the last.
    head = [
        problem.devices[d].stage_overhead_s
        + (problem.devices[d].head_decode_s if k == last else 0.0)
        for k, d in enumerate(order)
    ]

    def counts_within(bound: float) -> list[int]:
        # A small epsilon keeps a stage whose time equals the bound exactly.
        return [
            min(caps[k], math.floor((bound - head[k]) / cost[k] + 1e-9)) for k in range(len(order))
        ]

    levels = sorted(
        {n * cost[k] + head[k] for k in range(len(order)) for n in range(1, caps[k] + 1)}
    )
    lo, hi = 0, len(levels) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        got = counts_within(levels[mid])
        if min(got) >= 1 and sum(got) >= problem.n_layers:
            hi = mid
        else:
            lo = mid + 1
    counts = counts_within(levels[lo])
    # Shed the surplus from the slowest devices: the bound holds and single streams gain.
    surplus = sum(counts) - problem.n_layers
    for k in sorted(range(len(order)), key=lambda k: -cost[k]):
        drop = min(surplus, counts[k] - 1)
        counts[k] -= drop
        surplus -= drop
    return counts


def bandwidth_greedy(problem: Problem) -> Split | None:
    """Best of: the k fastest devices for every k, and each node's own devices alone."""
    fastest = sorted(
        range(len(problem.devices)), key=lambda d: (problem.devices[d].layer_decode_s, d)
    )
    candidates = [fastest[:k] for k in range(1, len(fastest) + 1)]
    nodes: dict[str, list[int]] = {}
    for d in fastest:
        nodes.setdefault(problem.devices[d].device.node_id, []).append(d)
    for members in nodes.values():
        candidates.extend(members[:k] for k in range(1, len(members) + 1))
    best: Split | None = None
    for chosen in candidates:
        split = split_for_order(problem, route(problem, chosen))
        if split is not None and (
            best is None or objective_s(problem, split) < objective_s(problem, best)
        ):
            best = split
    return best


def memory_proportional(problem: Problem) -> Split | None:
    """What exo and llama.cpp RPC do: every device, layers in proportion to free memory.

    Nodes in descending total memory, devices of a node side by side. Where a share does not
    fit (KV cache and overheads are not proportional) the excess moves to devices with room.
    """
    devices = problem.devices
    node_memory: dict[str, int] = {}
    for t in devices:
        node = t.device.node_id
        node_memory[node] = node_memory.get(node, 0) + t.device.memory_free_bytes
    order = sorted(
        range(len(devices)),
        key=lambda d: (
            -node_memory[devices[d].device.node_id],
            devices[d].device.node_id,
            -devices[d].device.memory_free_bytes,
            d,
        ),
    )
    total = sum(node_memory.values())
    if total == 0:
        return None
    shares = [problem.n_layers * devices[d].device.memory_free_bytes / total for d in order]
    counts = [math.floor(s) for s in shares]
    by_remainder = sorted(range(len(order)), key=lambda k: (counts[k] - shares[k], k))
    for k in by_remainder[: problem.n_layers - sum(counts)]:
        counts[k] += 1
    kept = [(d, n) for d, n in zip(order, counts, strict=True) if n > 0]
    return _spill(problem, kept)


def _spill(problem: Problem, stages: list[tuple[int, int]]) -> Split | None:
    order = tuple(d for d, _ in stages)
    caps = _caps(problem, order)
    counts = [n for _, n in stages]
    excess = 0
    for k in range(len(counts)):
        if counts[k] > caps[k]:
            excess += counts[k] - caps[k]
            counts[k] = caps[k]
    for k in sorted(range(len(counts)), key=lambda k: counts[k] - caps[k]):
        room = min(excess, caps[k] - counts[k])
        counts[k] += room
        excess -= room
    split = tuple((d, n) for d, n in zip(order, counts, strict=True) if n > 0)
    return split if excess == 0 and split and fits(problem, split) else None


def better(problem: Problem, a: Split | None, b: Split | None) -> Split | None:
    if a is None or b is None:
        return a or b
    return a if objective_s(problem, a) <= objective_s(problem, b) else b
