"""Where the torch engine runs and in which weight format."""

import ctypes
import gc
import os
import sys
from dataclasses import dataclass

import psutil
import torch
from loguru import logger

from exo.worker.engines.torch.quant import WeightFormat, int4_kernel_available
from exo.worker.runner.protocol import RUNNER_THREADS_ENV

# Overrides the weight format chosen per device (int4, bfloat16, float16, float32).
WEIGHTS_ENV = "EXO_TORCH_WEIGHTS"
_FORMATS: tuple[WeightFormat, ...] = ("int4", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    weights: WeightFormat
    # Residual stream, norms, attention and KV cache.
    activation_dtype: torch.dtype
    # CPU: the thread counts a step may use, fewest first (`cpu_threads`); empty on CUDA.
    threads: tuple[int, ...] = ()


def physical_cores() -> int:
    """Threads for this process: the machine's physical cores (hyperthreads share a core's
    load ports: a second thread per core slows GEMV down), but no more than the CPUs this
    process may run on (taskset, cgroup cpusets, a stage given its own cores)."""
    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if sys.platform == "linux":
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores)


def cpu_threads() -> tuple[int, ...]:
    """The thread counts of this process's CPU steps: its physical cores; for a stage that
    shares a node's cores with other stages of its instance ($EXO_RUNNER_THREADS "own,all",
    set by the worker: supervisor.runner_env), its share's count and the count of all of
    them. A value this process cannot use is logged and ignored."""
    cores = physical_cores()
    value = os.environ.get(RUNNER_THREADS_ENV, "").strip()
    if not value:
        return (cores,)
    try:
        own, every = (int(part) for part in value.split(","))
    except ValueError:
        own = every = 0
    if not 1 <= own < every <= cores:
        logger.warning(
            f"ignoring ${RUNNER_THREADS_ENV}={value!r}: expected 'own,all' thread counts "
            f"with 1 <= own < all <= {cores} (this process's cores)"
        )
        return (cores,)
    return (own, every)


def choose_placement(weights: WeightFormat | None = None) -> Placement:
    """CUDA with bf16 weights when present, else the CPU with int4 weights (float32 without
    the int4 kernel). An explicit format, or $EXO_TORCH_WEIGHTS, wins."""
    weights = weights or _format_from_env()
    if torch.cuda.is_available():
        fmt: WeightFormat = weights or "bfloat16"
        if fmt == "int4":
            raise ValueError("the int4 format runs on CPU only; use bfloat16 on CUDA")
        dtype = torch.float32 if fmt == "float32" else torch.bfloat16
        if fmt == "float16":
            dtype = torch.float16
        return Placement(torch.device("cuda"), fmt, dtype)
    threads = cpu_threads()
    torch.set_num_threads(threads[-1])
    fmt = weights or ("int4" if int4_kernel_available() else "float32")
    # The CPU keeps float32 between matmuls: bf16 there costs accuracy and saves nothing.
    return Placement(torch.device("cpu"), fmt, torch.float32, threads)


def _format_from_env() -> WeightFormat | None:
    value = os.environ.get(WEIGHTS_ENV, "").strip()
    if not value:
        return None
    for fmt in _FORMATS:
        if fmt == value:
            return fmt
    raise ValueError(f"${WEIGHTS_ENV}={value!r}; expected one of {', '.join(_FORMATS)}")


def release_scratch_memory() -> None:
    """Hand the loader's freed scratch back to the OS (glibc keeps it in its heap otherwise,
    and it would count as the model's resident memory)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    gc.collect()
    libc.malloc_trim(0)
