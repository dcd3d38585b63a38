"""Inference engines: the names a stage can run with, and the device kinds each runs on."""

from typing import Literal

from exo.shared.types.topology import DeviceKind

EngineName = Literal["mlx", "torch"]

# torch: CUDA and CPU (its int4 CPU kernels); MLX: Apple GPUs and CPU.
ENGINE_DEVICE_KINDS: dict[EngineName, tuple[DeviceKind, ...]] = {
    "torch": ("cuda", "cpu"),
    "mlx": ("metal", "cpu"),
}
