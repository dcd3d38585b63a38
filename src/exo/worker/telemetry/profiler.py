"""Short micro-benchmarks: memory bandwidth and compute throughput measured on a device.

Run when `--profile` is asked or when the spec table lacks a figure for the device's name
(always the case for CPUs). Each takes well under a second on a CPU and a few hundred
milliseconds on a GPU; they run in a worker thread, once per daemon start.

- bandwidth: a streaming copy (read N bytes, write N bytes), best of several, counted as
  2N bytes moved: the STREAM "copy" convention.
- compute: a square matmul (2 n^3 flops) as the engine that runs models on that device
  sees it (mlx on Metal, and on a CPU it runs; numpy's BLAS for torch on a CPU; torch on
  CUDA), best of several, after a warm-up.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    import mlx.core as mx
    import torch

from exo.shared.types.telemetry import DeviceSpec


@dataclass(frozen=True)
class Measurement:
    memory_bandwidth_bytes_per_s: float
    bandwidth_detail: str
    compute_flops: float
    compute_detail: str


class Benchmark(Protocol):
    def measure(self, device: DeviceSpec) -> Measurement | None: ...


def _best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up: allocation, first-touch page faults, kernel selection
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _mx_eval(*arrays: "mx.array") -> None:
    import mlx.core as mx

    mx.eval(*arrays)  # pyright: ignore[reportUnknownMemberType]


def cpu_bandwidth(n_bytes: int = 64 << 20, reps: int = 5) -> tuple[float, str]:
    n = n_bytes // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    seconds = _best_seconds(lambda: np.copyto(dst, src), reps)
    return 2 * n * 4 / seconds, f"numpy copy of {n_bytes >> 20} MiB, best of {reps}"


def cpu_compute(engine: str, n: int = 512, reps: int = 3) -> tuple[float, str]:
    """An f32 square matmul's throughput on this CPU, as the engine's prefill would see it.

    MLX's CPU matmul runs far below the machine's BLAS (~8 against ~130 GFLOP/s here), so
    the mlx engine is measured with mlx. torch's CPU matmul and numpy's BLAS agree to
    within the run-to-run spread (docs/telemetry.md), and importing torch into the daemon
    only for this would cost every start ~4 s and the daemon ~0.5 GB for its whole life,
    so torch (and a node without mlx) is measured with numpy."""
    flops = 2.0 * n**3
    if engine == "mlx" and (mlx_seconds := _mlx_cpu_matmul_seconds(n, reps)) is not None:
        return flops / mlx_seconds, f"mlx f32 matmul {n}x{n} on cpu, best of {reps}"
    x = np.ones((n, n), dtype=np.float32)
    seconds = _best_seconds(lambda: x @ x, reps)
    return flops / seconds, f"numpy f32 matmul {n}x{n}, best of {reps}"


def _mlx_cpu_matmul_seconds(n: int, reps: int) -> float | None:
    """None where mlx is not installed."""
    try:
        import mlx.core as mx
    except ImportError:
        return None
    with mx.stream(mx.cpu):
        m = mx.ones((n, n), dtype=mx.float32)
        _mx_eval(m)
        return _best_seconds(lambda: _mx_eval(m @ m), reps)


def metal_figures(n_bytes: int = 256 << 20, n: int = 4096, reps: int = 5) -> Measurement:
    import mlx.core as mx

    with mx.stream(mx.gpu):
        src = mx.ones((n_bytes // 4,), dtype=mx.float32)
        m = mx.ones((n, n), dtype=mx.float32)
        _mx_eval(src, m)
        copy_s = _best_seconds(lambda: _mx_eval(src * 1.0), reps)
        mm_s = _best_seconds(lambda: _mx_eval(m @ m), reps)
    return Measurement(
        memory_bandwidth_bytes_per_s=2 * n_bytes / copy_s,
        bandwidth_detail=f"mlx copy of {n_bytes >> 20} MiB on gpu, best of {reps}",
        compute_flops=2.0 * n**3 / mm_s,
        compute_detail=f"mlx f32 matmul {n}x{n} on gpu, best of {reps}",
    )


def cuda_figures(
    index: int, n_bytes: int = 512 << 20, n: int = 8192, reps: int = 10
) -> Measurement:
    import torch

    device = torch.device("cuda", index)
    copy_s, mm_s = _cuda_seconds(device, n_bytes, n, reps)
    torch.cuda.empty_cache()
    return Measurement(
        memory_bandwidth_bytes_per_s=2 * n_bytes / copy_s,
        bandwidth_detail=f"torch device copy of {n_bytes >> 20} MiB on cuda:{index}, best of {reps}",
        compute_flops=2.0 * n**3 / mm_s,
        compute_detail=f"torch f16 matmul {n}x{n} on cuda:{index}, best of {reps}",
    )


def _cuda_seconds(device: "torch.device", n_bytes: int, n: int, reps: int) -> tuple[float, float]:
    import torch

    src = torch.ones(n_bytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    a = torch.ones((n, n), dtype=torch.float16, device=device)

    def timed(fn: Callable[[], object]) -> float:
        def run() -> None:
            fn()
            torch.cuda.synchronize(device)

        return _best_seconds(run, reps)

    return timed(lambda: dst.copy_(src)), timed(lambda: a @ a)


class EngineBenchmark:
    """Measures with the engine that would run a model on the device."""

    def __init__(self, cpu_engine: str = "mlx") -> None:
        self._cpu_engine = cpu_engine

    def measure(self, device: DeviceSpec) -> Measurement | None:
        match device.kind:
            case "cpu":
                bandwidth, bandwidth_detail = cpu_bandwidth()
                compute, compute_detail = cpu_compute(self._cpu_engine)
                return Measurement(bandwidth, bandwidth_detail, compute, compute_detail)
            case "metal":
                return metal_figures()
            case "cuda":
                return cuda_figures(device.index)
