"""`$EXO_TORCH_COMPILE` and `$EXO_TORCH_SAVED_GRAPHS`, read without importing torch: benches
of MLX runs and the test suite set them too."""

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# "0" turns compiled decode off (eager only); "all" compiles every bucket at load.
COMPILE_ENV = "EXO_TORCH_COMPILE"
# "0" neither loads saved graphs nor saves them; "load" loads but starts no saver
# (saved_graphs.py).
SAVED_GRAPHS_ENV = "EXO_TORCH_SAVED_GRAPHS"


def compile_wanted(device: "torch.device") -> bool:
    """On CPU unless $EXO_TORCH_COMPILE=0 (CUDA replays graphs instead: graphs.py)."""
    return device.type == "cpu" and os.environ.get(COMPILE_ENV, "1").strip() != "0"


def compile_all_at_load() -> bool:
    """$EXO_TORCH_COMPILE=all: every bucket before the stage reports ready."""
    return os.environ.get(COMPILE_ENV, "").strip() == "all"


def measure_compiled_steady_state() -> None:
    """For benches: torch stages loaded from now on, in this process or its children, compile
    every bucket at load (unless $EXO_TORCH_COMPILE says otherwise), so that no measurement
    meets an eager batch or a compile under way in idle time; they load saved steps but
    start no saver (minutes of idle CPU beside the measurement)."""
    os.environ.setdefault(COMPILE_ENV, "all")
    os.environ.setdefault(SAVED_GRAPHS_ENV, "load")


def saved_graphs_mode() -> str:
    """One of "off", "load" or "save" (load and save), from $EXO_TORCH_SAVED_GRAPHS."""
    value = os.environ.get(SAVED_GRAPHS_ENV, "").strip().lower()
    if value == "0":
        return "off"
    return "load" if value == "load" else "save"
