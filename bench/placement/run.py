"""Placement scenario suite: our placement against the memory-proportional split.

For every scenario and objective: predicted tokens/s of ours / of the baseline (single-stream
tokens/s for latency, pipeline tokens/s for throughput) and the wall time of `place()`
(median of --rounds). Then solve times on random 16- and 64-device clusters.

    uv run python -m bench.placement.run [--rounds 3] [--seeds 5]
"""

import argparse
import math
import statistics

from bench.placement.scenarios import Scenario, random_scale, scenarios

from exo.master.solver import baseline, place
from exo.shared.types.placement import Objective, Placement, PlacementRequest


def _run(
    sc: Scenario, objective: Objective, rounds: int
) -> tuple[Placement | None, float, Placement | None]:
    request = PlacementRequest(objective=objective)
    times: list[float] = []
    result = None
    for _ in range(rounds):
        out = place(sc.model, sc.cluster, request)
        result = out if isinstance(out, Placement) else None
        times.append(out.solver.solve_time_s if isinstance(out, Placement) else math.nan)
    return result, statistics.median(times), baseline(sc.model, sc.cluster, request)


def _rate(p: Placement, objective: Objective) -> float:
    return (
        p.prediction.tokens_per_s
        if objective == "latency"
        else p.prediction.throughput_tokens_per_s
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    print(
        "| scenario | objective | devices | stages (ours) | ours tok/s | baseline tok/s | ratio | status | solve ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    ratios: dict[bool, list[float]] = {True: [], False: []}
    for sc in scenarios():
        for objective in ("latency", "throughput"):
            ours, ms, base = _run(sc, objective, args.rounds)
            if ours is None:
                print(f"| {sc.name} | {objective} | infeasible |")
                continue
            mine = _rate(ours, objective)
            theirs = _rate(base, objective) if base is not None else math.nan
            ratio = mine / theirs
            if not math.isnan(ratio):
                ratios[sc.mixed].append(ratio)
            stages = " ".join(f"{s.device_name}:{s.n_layers}" for s in ours.stages)
            print(
                f"| {sc.name} | {objective} | {len(sc.cluster.devices)} | {stages} | {mine:.1f} | {theirs:.1f} "
                f"| {ratio:.2f}x | {ours.solver.status} | {ms * 1e3:.0f} |"
            )
    for mixed, name in ((True, "mixed generations"), (False, "same generation")):
        values = ratios[mixed]
        if values:
            geo = math.exp(sum(map(math.log, values)) / len(values))
            print(
                f"\ngeometric mean ratio, {name}: {geo:.2f}x (min {min(values):.2f}x over {len(values)} runs)"
            )
    print(
        "\n| cluster | model | objective | solve ms (median / max over seeds) | statuses | ratio vs baseline (min) |"
    )
    print("|---|---|---|---|---|---|")
    for n, model in ((16, "llama-70b-bf16"), (64, "llama-405b-bf16")):
        for objective in ("latency", "throughput"):
            times: list[float] = []
            statuses: list[str] = []
            worst = math.inf
            for seed in range(args.seeds):
                sc = random_scale(n, seed, model)
                ours, ms, base = _run(sc, objective, 1)
                if ours is None:
                    statuses.append("infeasible")
                    continue
                times.append(ms)
                statuses.append(ours.solver.status)
                if base is not None:
                    worst = min(worst, _rate(ours, objective) / _rate(base, objective))
            counts = {s: statuses.count(s) for s in sorted(set(statuses))}
            print(
                f"| {n} devices | {model} | {objective} | {statistics.median(times) * 1e3:.0f} / {max(times) * 1e3:.0f} "
                f"| {counts} | {worst:.2f}x |"
            )


if __name__ == "__main__":
    main()
