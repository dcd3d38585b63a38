"""Turn a split into the explained `Placement`: layer ranges, stage times, memory per device."""

from exo.master.solver.cost import (
    Problem,
    Split,
    bottleneck_s,
    latency_s,
    stage_decode_s,
    stage_prefill_s,
    ttft_s,
)
from exo.shared.types.placement import (
    MemoryUse,
    Placement,
    Prediction,
    SolverReport,
    SolverStatus,
    Stage,
)


def memory_use(problem: Problem, device: int, layers: int, end: bool) -> MemoryUse:
    terms = problem.devices[device]
    weights = layers * terms.layer_bytes + (terms.non_layer_bytes if end else 0)
    kv = layers * terms.kv_bytes_per_layer
    return MemoryUse(
        weights_format=terms.weights,
        weights_bytes=weights,
        kv_cache_bytes=kv,
        overhead_bytes=terms.overhead_bytes,
        total_bytes=weights + kv + terms.overhead_bytes,
        free_bytes=terms.device.memory_free_bytes,
        usable_bytes=terms.usable_bytes,
    )


def to_placement(
    problem: Problem,
    split: Split,
    status: SolverStatus,
    solve_time_s: float,
    time_limit_s: float,
    bound_s: float | None = None,
) -> Placement:
    stages: list[Stage] = []
    at = 0
    last = len(split) - 1
    for k, (d, n) in enumerate(split):
        terms = problem.devices[d]
        nxt = split[(k + 1) % len(split)][0]
        hop = problem.return_s[d][nxt] if k == last else problem.handoff_s[d][nxt]
        stages.append(
            Stage(
                device_id=terms.device.device_id,
                node_id=terms.device.node_id,
                device_name=terms.device.name,
                engine=terms.engine,
                start_layer=at,
                end_layer=at + n,
                holds_embedding=k == 0,
                holds_head=k == last,
                decode_time_s=stage_decode_s(problem, d, n, k == last),
                prefill_time_s=stage_prefill_s(problem, d, n, k == last),
                handoff_s=hop or 0.0,
                handoff_local=problem.local(d, nxt),
                memory=memory_use(problem, d, n, end=k in (0, last)),
            )
        )
        at += n
    per_token = latency_s(problem, split)
    neck = bottleneck_s(problem, split)
    return Placement(
        model_id=problem.card.model_id,
        objective=problem.request.objective,
        stages=tuple(stages),
        prediction=Prediction(
            time_per_token_s=per_token,
            tokens_per_s=1.0 / per_token,
            bottleneck_s=neck,
            throughput_tokens_per_s=1.0 / neck,
            ttft_s=ttft_s(problem, split),
            reference_prompt_tokens=problem.request.reference_prompt_tokens,
            context_length=problem.context_length,
        ),
        solver=SolverReport(
            status=status,
            solve_time_s=solve_time_s,
            time_limit_s=time_limit_s,
            bound_s=bound_s,
            eligible_devices=len(problem.devices),
        ),
    )
