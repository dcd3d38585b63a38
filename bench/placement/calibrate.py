"""Calibrate the placement cost model against an engine on this machine's CPU.

Measures, for the built-in model (SmolLM2-135M) with the named engine:
- the bandwidth figure telemetry reports for this CPU (`cpu_bandwidth`, the same probe);
- the decode step time of first stages [0, k) for several k (a straight line in k: the slope
  is the time per layer, the intercept the stage's fixed cost);
- for torch, one pass of the int4 kernels over every layer's weights (what the weight reads
  alone reach: the engine's share of the bandwidth figure);
- end to end, decode tokens/s of `generate` on the whole model (what a runner reports in
  `TaskFinished`);
- the compute figure telemetry reports for this CPU with the engine (`cpu_compute`) and the
  whole model's prefill of a prompt (`--prefill-tokens`, the cost model's reference 512):
  the engine's prefill flops per second as a share of that figure (`compute_fraction`).

It prints the fitted `EngineEfficiency` and the cost model's predictions, with the
defaults in `exo.shared.types.placement`, against the measurements.

    uv run python -m bench.placement.calibrate [--engine torch|mlx] [--tokens 128] [--rounds 3]
        [--prefill-tokens 512]
"""

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from exo.master.solver import place
from exo.master.solver.cost import (
    Problem,
    bytes_per_param,
    compile_problem,
    holding,
    stage_decode_s,
    stage_prefill_s,
)
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.models.store import ModelStore
from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.engines import EngineName
from exo.shared.types.ids import NodeId, TaskId
from exo.shared.types.placement import EngineEfficiency, Placement, PlacementRequest
from exo.shared.types.topology import ClusterView, DeviceId, DeviceProfile
from exo.worker.cpu_features import cpu_flags, kernels_for
from exo.worker.engines.base import ChatTokenizer, Engine, ShardSpec, load_engine, warm_up
from exo.worker.engines.torch.compile_env import measure_compiled_steady_state
from exo.worker.generate import generate
from exo.worker.telemetry.profiler import cpu_bandwidth, cpu_compute

CARD = SMOLLM2_135M_INSTRUCT
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
FIRST_STAGES = (6, 12, 18, 24)
GREEDY = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)


# The variant of our CPU kernels this CPU runs (telemetry reports the same).
KERNELS = kernels_for(cpu_flags())


def _noop(_: float) -> None:
    return None


def step_time(engine: Engine[Any, Any], position: int, steps: int) -> float:
    """Seconds of the fastest decode step at about `position` tokens of cache.

    The fastest, not the median: on a shared machine most steps wait for the CPU, and the
    cost model describes the device's capability, not its neighbours' load."""
    request = engine.new_request(position + steps + 2, seed=0)
    if engine.shard.is_first:
        engine.to_numpy(engine.forward(engine.token_input([1] * position), request))
        x = engine.token_input([1])
    else:
        x = engine.from_numpy(np.zeros((1, 1, engine.hidden_size), dtype=np.float32))
    times: list[float] = []
    for _ in range(steps):
        started = time.perf_counter()
        out = engine.forward(x, request)
        if engine.shard.is_last:
            engine.read_token(engine.sample(out, GREEDY, request))
        else:
            engine.to_numpy(out)
        times.append(time.perf_counter() - started)
    return min(times)


def kernel_pass_s(engine: Engine[Any, Any], rounds: int = 20) -> tuple[float, int] | None:
    """torch only: one pass of the quantized matmuls over every layer, and the bytes they read."""
    import torch

    from exo.worker.engines.torch.engine import TorchEngine
    from exo.worker.engines.torch.llama import quantized_layers

    if not isinstance(engine, TorchEngine):
        return None
    linears = list(quantized_layers(engine.stage))
    read = sum(lin.weight_bytes for lin in linears)
    inputs = [torch.ones(1, lin.in_features) for lin in linears]
    best = float("inf")
    with torch.no_grad():
        for _ in range(rounds):
            started = time.perf_counter()
            for lin, x in zip(linears, inputs, strict=True):
                lin(x)
            best = min(best, time.perf_counter() - started)
    return best, read


def generate_tps(engine: Engine[Any, Any], tokenizer: ChatTokenizer, n: int) -> float:
    params = ChatParams(
        messages=(ChatMessage(role="user", content=PROMPT),),
        sampling=SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0),
    )
    times: list[float] = []
    for message in generate(engine, tokenizer, TaskId("calibrate"), params):
        if message.kind == "token":
            times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


def prefill_s(engine: Engine[Any, Any], tokens: int) -> float:
    """Seconds to prefill a prompt of `tokens` through the whole model (to its logits)."""
    request = engine.new_request(tokens + 2, seed=0)
    start = time.perf_counter()
    engine.to_numpy(
        engine.forward(engine.token_input([100 + i % 50 for i in range(tokens)]), request)
    )
    seconds = time.perf_counter() - start
    release = getattr(engine, "release", None)
    if release is not None:
        release(request)
    return seconds


def fit_line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least squares y = intercept + slope x."""
    slope, intercept = np.polyfit(np.array(xs, dtype=float), np.array(ys), 1)
    return float(slope), float(intercept)


def this_cpu(bandwidth: float, compute: float = 1e11) -> ClusterView:
    device = DeviceProfile(
        device_id=DeviceId("here/cpu"),
        node_id=NodeId("here"),
        name="this CPU",
        kind="cpu",
        memory_free_bytes=8 << 30,
        memory_bandwidth_bytes_per_s=bandwidth,
        compute_flops=compute,
        cpu_kernels=KERNELS,
    )
    return ClusterView(devices=(device,))


def predicted(
    engine: EngineName, bandwidth: float, position: int, compute: float = 1e11
) -> Placement:
    request = PlacementRequest(engine=engine, reference_prompt_tokens=position)
    result = place(CARD, this_cpu(bandwidth, compute), request)
    assert isinstance(result, Placement), result
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["torch", "mlx"], default="torch")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    args = parser.parse_args()
    engine_name: EngineName = args.engine
    n: int = args.tokens
    measure_compiled_steady_state()
    model_dir: Path = ModelStore(Path.home() / ".cache" / "exo" / "models").ensure(CARD.model_id)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    prompt = len(tokenizer.encode_chat([ChatMessage(role="user", content=PROMPT)]))
    # Decode reads the KV cache up to the current position: on average the middle of the reply.
    position = prompt + n // 2

    # Load everything first, then alternate the probes round by round: load from other
    # processes hits all of them alike. `best` is the least contended round.
    half = CARD.n_layers // 2
    shapes = {f"first [0, {k})": ShardSpec(0, k, CARD.n_layers) for k in FIRST_STAGES}
    shapes[f"last [{half}, {CARD.n_layers})"] = ShardSpec(half, CARD.n_layers, CARD.n_layers)
    shapes["whole"] = ShardSpec(0, CARD.n_layers, CARD.n_layers)
    engines = {
        name: load_engine(engine_name, model_dir, spec, _noop) for name, spec in shapes.items()
    }
    for engine in engines.values():
        warm_up(engine)
    whole = engines["whole"]
    probes: dict[str, Callable[[], float]] = {
        name: functools.partial(step_time, engine, position, args.steps)
        for name, engine in engines.items()
    }
    probes["generate"] = lambda: 1.0 / generate_tps(whole, tokenizer, n)
    probes["bandwidth"] = lambda: 1.0 / cpu_bandwidth()[0]
    probes["compute"] = lambda: 1.0 / cpu_compute(engine_name)[0]
    probes["prefill"] = functools.partial(prefill_s, whole, args.prefill_tokens)
    seconds: dict[str, list[float]] = {name: [] for name in probes}
    kernels: list[tuple[float, int]] = []
    for _ in range(args.rounds):
        for name, probe in probes.items():
            gc.collect()
            seconds[name].append(probe())
        kernel_once = kernel_pass_s(whole)
        if kernel_once is not None:
            kernels.append(kernel_once)
    best = {name: min(v) for name, v in seconds.items()}
    typical = {name: statistics.median(v) for name, v in seconds.items()}
    bandwidth = 1.0 / best["bandwidth"]
    compute = 1.0 / best["compute"]
    # Prefill: the layers' matmuls over the prompt (2 flops per weight), against the figure.
    prefill_flops = 2.0 * CARD.bytes_per_layer / bytes_per_param(CARD.dtype) * CARD.n_layers
    compute_fraction = prefill_flops * args.prefill_tokens / best["prefill"] / compute
    kernel = min(kernels) if kernels else None
    stage_steps = {k: best[f"first [0, {k})"] for k in FIRST_STAGES}

    # The fit: time per layer = (weights + KV read) / (bandwidth x fraction) + layer overhead.
    slope, intercept = fit_line(list(stage_steps), list(stage_steps.values()))
    held = holding(CARD, engine_name, "cpu")  # torch keeps the KV cache in float32 on CPU
    layer_read = held.layer_bytes + held.kv_bytes_per_token_per_layer * position
    if kernel is not None:
        fraction = kernel[1] / (kernel[0] * bandwidth)
    else:  # no kernel-only probe: the whole per-layer time counts as weight reads
        fraction = layer_read / (slope * bandwidth)
    layer_overhead = max(0.0, slope - layer_read / (bandwidth * fraction))
    head_bytes = min(CARD.bytes_non_layer, CARD.vocab_size * CARD.hidden_size * 0.625)
    # The rest of one token of the whole model, as `generate` reports it: embedding, head
    # beyond its weight reads, sampling, the loop.
    token_overhead = best["generate"] - CARD.n_layers * slope - head_bytes / (bandwidth * fraction)
    fitted = EngineEfficiency(
        engine=engine_name,
        kind="cpu",
        bandwidth_fraction=round(fraction, 3),
        layer_overhead_s=round(layer_overhead, 6),
        token_overhead_s=round(max(token_overhead, 0.0), 5),
        compute_fraction=round(compute_fraction, 2),
        cpu_kernels=KERNELS if engine_name == "torch" else None,
        source="bench/placement/calibrate.py",
    )

    ours = predicted(engine_name, bandwidth, position)
    problem = problem_here(engine_name, bandwidth, position)
    print(f"engine {engine_name}; prompt {prompt} tokens + {n} new (position ~{position})")
    print(f"bandwidth figure (telemetry's probe) {bandwidth / 1e9:.1f} GB/s")
    print(
        f"compute figure (telemetry's probe) {compute / 1e9:.1f} GFLOP/s; prefill of "
        f"{args.prefill_tokens} tokens {best['prefill'] * 1e3:.0f} ms = "
        f"{compute_fraction:.2f} of the figure"
    )
    if kernel is not None:
        print(
            f"int4 kernels alone: {kernel[1] / 1e6:.1f} MB in {kernel[0] * 1e3:.2f} ms = "
            f"{kernel[1] / kernel[0] / 1e9:.1f} GB/s = {fraction:.3f} of the figure"
        )
    print(f"fit over first stages: {slope * 1e6:.0f} us per layer + {intercept * 1e3:.2f} ms")
    print(f"fitted: {fitted.model_dump_json()}")
    used = problem.request.params.efficiency(engine_name, "cpu", KERNELS)
    print(f"in use: {used.model_dump_json()}")
    print()
    print("| | predicted | measured (best) | error | measured (median) |")
    print("|---|---|---|---|---|")
    rows = [
        (
            "whole model, decode tokens/s (generate)",
            ours.prediction.tokens_per_s,
            1 / best["generate"],
            1 / typical["generate"],
        ),
        (
            "whole model, ms per step (engine)",
            ours.stages[0].decode_time_s * 1e3,
            best["whole"] * 1e3,
            typical["whole"] * 1e3,
        ),
    ]
    prefill_problem = problem_here(engine_name, bandwidth, args.prefill_tokens, compute)
    whole_prefill = stage_prefill_s(prefill_problem, 0, CARD.n_layers, last=True)
    rows.append(
        (
            f"whole model, ms to prefill {args.prefill_tokens} tokens",
            whole_prefill * 1e3,
            best["prefill"] * 1e3,
            typical["prefill"] * 1e3,
        )
    )
    for name, spec in shapes.items():
        if name == "whole":
            continue
        guess = stage_decode_s(problem, 0, spec.end_layer - spec.start_layer, last=spec.is_last)
        rows.append((f"{name}, ms per step", guess * 1e3, best[name] * 1e3, typical[name] * 1e3))
    for label, guess, got, median in rows:
        error = 100 * (guess - got) / got
        print(f"| {label} | {guess:.2f} | {got:.2f} | {error:+.0f} % | {median:.2f} |")


def problem_here(
    engine: EngineName, bandwidth: float, position: int, compute: float = 1e11
) -> Problem:
    view = this_cpu(bandwidth, compute)
    request = PlacementRequest(engine=engine, reference_prompt_tokens=position)
    return compile_problem(CARD, view, view.devices, request)


if __name__ == "__main__":
    main()
