"""Fixed-shape decode steps over a `SlotCache`, captured as a CUDA graph on CUDA.

A decode step of a small model is hundreds of kernel launches, each a few microseconds of
host time: on a GPU the host, not the GPU, sets the pace. Captured once and replayed, a
step is one launch and holds no host sync; the host only reads the sampled tokens.
Elsewhere the same code runs eagerly, which is how its shapes are tested on CPU.

Flow: prefill a request into `request_cache(slot)` (a view of the slot) with the engine's
`forward_batch`, `start(slot, cache)`, then `step` for every slot at once; `finish(slot)`
frees the slot for the next request.
"""

import torch
from torch import Tensor

from exo.worker.engines.torch.cache import KVCache, SlotBatch, SlotCache
from exo.worker.engines.torch.llama import LlamaStage

_WARM_UP_STEPS = 2


class SlotDecoder:
    def __init__(self, stage: LlamaStage, cache: SlotCache, use_graph: bool) -> None:
        self.stage = stage
        self.cache = cache
        device = cache.lengths.device
        if stage.is_first:
            self.inputs = torch.zeros((cache.slots, 1), dtype=torch.int64, device=device)
        else:
            shape = (cache.slots, 1, stage.args.hidden_size)
            self.inputs = torch.zeros(shape, dtype=stage.activation_dtype, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._output: Tensor | None = None
        if use_graph:
            self._capture()

    @torch.no_grad()
    def _run(self) -> Tensor:
        out = self.stage(self.inputs, SlotBatch(self.cache))
        # The greedy pick stays on the device too (the last stage's next input).
        return out.argmax(dim=-1, keepdim=True) if self.stage.is_last else out

    def _capture(self) -> None:
        # Warm up on a side stream so lazy initialisation happens outside the graph; no slot
        # is active yet, so these steps advance nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(_WARM_UP_STEPS):
                self._run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._output = self._run()
        self.graph = graph

    def request_cache(self, slot: int) -> KVCache:
        """The slot's cache as a request cache, to prefill the request into."""
        return self.cache.view(slot)

    def start(self, slot: int, prefilled: KVCache) -> None:
        self.cache.occupy(slot, prefilled.length)

    def finish(self, slot: int) -> None:
        self.cache.release(slot)

    def step(self, inputs: Tensor) -> Tensor:
        """inputs [slots, 1] ids (or [slots, 1, D] hidden) -> greedy ids [slots, 1] on the
        last stage, else hidden [slots, 1, D]. On CUDA the result is a buffer the next step
        overwrites."""
        self.inputs.copy_(inputs)
        if self.graph is None or self._output is None:
            return self._run()
        self.graph.replay()
        return self._output
