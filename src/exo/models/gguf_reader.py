# pyright: basic
# Adapter over mlx.core.load's GGUF reader, whose metadata values are untyped (Any).
"""Read a GGUF file into numpy tensors and typed metadata."""

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from numpy.typing import NDArray

# What GGUF metadata values become once taken out of MLX arrays.
MetadataValue = str | int | float | bool | list[str] | list[int] | list[float]


@dataclass(frozen=True)
class GgufFile:
    """Tensors keep MLX's affine quantized layout: packed uint32 + f16 scales + f16 biases."""

    tensors: dict[str, NDArray[np.generic]]
    metadata: dict[str, MetadataValue]

    def integer(self, key: str) -> int:
        value = self.metadata[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"GGUF metadata {key} is not an integer: {value!r}")
        return value

    def real(self, key: str) -> float:
        value = self.metadata[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"GGUF metadata {key} is not a number: {value!r}")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.metadata.get(key, default)
        if not isinstance(value, bool):
            raise ValueError(f"GGUF metadata {key} is not a boolean: {value!r}")
        return value

    def text(self, key: str) -> str:
        value = self.metadata[key]
        if not isinstance(value, str):
            raise ValueError(f"GGUF metadata {key} is not a string: {value!r}")
        return value

    def texts(self, key: str) -> list[str]:
        value = self.metadata[key]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"GGUF metadata {key} is not a list of strings")
        return [str(item) for item in value]

    def integers(self, key: str) -> list[int]:
        value = self.metadata[key]
        if not isinstance(value, list) or not all(isinstance(item, int) for item in value):
            raise ValueError(f"GGUF metadata {key} is not a list of integers")
        return [int(item) for item in value]


def read_gguf(path: Path) -> GgufFile:
    loaded = mx.load(str(path), return_metadata=True)
    if not isinstance(loaded, tuple):
        raise ValueError(f"{path} did not load as a GGUF file with metadata")
    arrays, raw_metadata = loaded
    tensors = {name: np.asarray(array) for name, array in arrays.items()}
    metadata = {key: _to_python(value) for key, value in raw_metadata.items()}
    return GgufFile(tensors=tensors, metadata=metadata)


def _to_python(value: object) -> MetadataValue:
    if isinstance(value, mx.array):
        value = value.tolist()
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        strings = [item for item in value if isinstance(item, str)]
        integers = [item for item in value if isinstance(item, int)]
        reals = [item for item in value if isinstance(item, float)]
        for narrowed in (strings, integers, reals):
            if len(narrowed) == len(value):
                return narrowed
    raise ValueError(f"unsupported GGUF metadata value: {value!r}")
