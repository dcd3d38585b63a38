"""Which variant of our quantized CPU kernels (engines/torch/kernels) a CPU runs: read from
/proc/cpuinfo without importing torch, for the kernels' loader and for telemetry (placement
costs a torch CPU stage's prefill by it: docs/placement.md, "Calibration")."""

from pathlib import Path

from exo.shared.types.telemetry import CpuKernels

# What the AVX2 variant needs.
AVX2_FLAGS = frozenset({"avx2", "fma", "f16c"})
# What the AVX512-VNNI variant needs besides (as qmm.cpp checks with __builtin_cpu_supports).
AVX512_VNNI_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"})


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str] | None:
    """The first CPU's flags; None where there is no /proc/cpuinfo (not Linux) or no flags
    line (ARM Linux names them "Features")."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def kernels_for(flags: frozenset[str] | None) -> CpuKernels | None:
    """The variant our kernels run with these flags; None when the flags are unknown."""
    if flags is None:
        return None
    if not flags >= AVX2_FLAGS:
        return "none"
    return "avx512-vnni" if flags >= AVX512_VNNI_FLAGS else "avx2"
