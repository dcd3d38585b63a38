"""Which engine a node runs by default: MLX on Apple silicon, torch everywhere else."""

import platform
import sys
from pathlib import Path

from exo.shared.types.instances import EngineName


def default_engine(platform: str, has_cuda: bool, machine: str = "arm64") -> EngineName:
    """platform as `sys.platform` spells it, machine as `platform.machine()`.

    Apple silicon (macOS on arm64) gets MLX's Metal kernels; NVIDIA GPUs, Linux CPUs and
    Intel Macs get torch, whose int4 CPU kernels are ~10x faster than MLX's CPU path here.
    """
    if has_cuda:
        return "torch"
    if platform == "darwin" and machine == "arm64":
        return "mlx"
    return "torch"


def this_machines_engine() -> EngineName:
    """`default_engine` for this machine. An NVIDIA driver exposes /dev/nvidiactl: no need to
    import torch to find out."""
    return default_engine(sys.platform, Path("/dev/nvidiactl").exists(), platform.machine())
