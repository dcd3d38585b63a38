"""Decode steps through `torch.compile` (inductor) on CPU, eager when that is not possible.

An eager decode step of a small model is ~1,500 tiny ops, each a few microseconds of
dispatch: as much time as the int4 matmuls themselves. Inductor fuses what lies between
the matmuls (norms, RoPE, residuals, SiLU, casts) into a few C++ loops. Each layer's two
halves around the cache are compiled (`TransformerBlock.before_attention` and
`after_attention`); the attention stays eager, since its cache lengths change every step
and differ per request. The layer is an argument, not a constant, so one graph per half
serves every layer: compiling takes seconds, not the minutes a whole unrolled stage takes.
The batch size is the only shape that varies: one graph for a single request, one with the
batch size symbolic for 2 and more.

Any failure to compile (no C++ compiler, an inductor bug) falls back to eager for good.
"""

import os
import time
from collections.abc import Callable
from typing import Any

import torch
from loguru import logger
from torch import Tensor

from exo.worker.engines.torch.cache import AttentionBatch
from exo.worker.engines.torch.llama import BlockSteps, LlamaStage, Rope, TransformerBlock

# "0" turns compiled decode off (eager only).
COMPILE_ENV = "EXO_TORCH_COMPILE"


def compile_wanted(device: torch.device) -> bool:
    """On CPU unless $EXO_TORCH_COMPILE=0 (CUDA replays graphs instead: graphs.py)."""
    return device.type == "cpu" and os.environ.get(COMPILE_ENV, "1").strip() != "0"


def _before_attention(
    layer: TransformerBlock, x: Tensor, rope: Rope
) -> tuple[Tensor, Tensor, Tensor]:
    return layer.before_attention(x, rope)


def _after_attention(layer: TransformerBlock, x: Tensor, attended: Tensor) -> Tensor:
    return layer.after_attention(x, attended)


def _head(stage: LlamaStage, h: Tensor) -> Tensor:
    return stage.head(h)


class CompiledDecoder:
    """One-token steps (x [B, 1] ids or [B, 1, D] hidden) of a stage, compiled."""

    def __init__(self, stage: LlamaStage) -> None:
        self.stage = stage
        self.failed = False
        # The fused loops are a few thousand elements: serial C++. Threaded, each would be an
        # OpenMP barrier, and a barrier waits a whole time slice whenever the other core is
        # busy (measured: 2.6 instead of 40 tokens/s beside other jobs). The int4 matmuls
        # stay aten kernels on torch's threads.
        options: dict[str, str | int | bool | Callable[..., Any]] = {"cpp.threads": 1}
        self._steps = BlockSteps(
            torch.compile(_before_attention, fullgraph=True, options=options),
            torch.compile(_after_attention, fullgraph=True, options=options),
            torch.compile(_head, fullgraph=True, options=options),
        )

    def __call__(self, x: Tensor, batch: AttentionBatch) -> Tensor:
        """The stage's output for one decode step; advances the batch like the stage."""
        if not self.failed:
            try:
                out = self.stage.forward(x, batch, self._steps)
            except Exception:  # any failure to compile means: run eagerly
                # Nothing advanced yet: the eager step rewrites the same cache positions.
                logger.opt(exception=True).warning("compiled decode failed; decoding eagerly")
                self.failed = True
            else:
                batch.advance()
                return out
        return self.stage(x, batch)

    def prepare(self, run_step: Callable[[int], object]) -> None:
        """Compile for one request and for batches of two or more (two graphs per half) by
        running a dummy step of each size, so that no request waits for the compiler."""
        started = time.perf_counter()
        for batch_size in (1, 2):
            run_step(batch_size)
            if self.failed:
                return
        logger.info(f"compiled decode steps in {time.perf_counter() - started:.1f} s")
