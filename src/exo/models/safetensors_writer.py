"""A streaming safetensors writer, so conversion progress counts bytes actually written."""

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

_DTYPES: dict[np.dtype[np.generic], str] = {
    np.dtype(np.uint32): "U32",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint8): "U8",
    np.dtype(np.float16): "F16",
    np.dtype(np.float32): "F32",
}
# Bytes between progress reports: bounds the callback count for any model size.
_CHUNK = 8 * 1024 * 1024


def write_safetensors(
    path: Path,
    tensors: Sequence[tuple[str, NDArray[np.generic]]],
    metadata: dict[str, str],
    on_bytes: Callable[[int], None],
) -> None:
    """Write tensors in order; `on_bytes(n)` after every chunk of n bytes of tensor data."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors:
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"{name}: no safetensors dtype for {tensor.dtype}")
        header[name] = {
            "dtype": _DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # The data must start 8-byte aligned; the format pads the header with spaces.
    encoded += b" " * (-len(encoded) % 8)
    with path.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for _, tensor in tensors:
            data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
            for start in range(0, data.size, _CHUNK):
                chunk = data[start : start + _CHUNK].tobytes()
                out.write(chunk)
                on_bytes(len(chunk))
