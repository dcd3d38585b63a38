"""The torch engine: one Llama-family stage behind the `Engine` interface, plus batched
decode for the runner's continuous batching.

Batching: `forward_batch` advances several requests by the same number of tokens in one
pass (the weights are read once for all of them), each with its own cache and position;
`sample_batch` and `read_tokens` finish the step with a single host sync. A request joins
by being prefilled alone (`forward`), then is simply included in the next step's list.
"""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor

from exo.shared.types.chat import SamplingParams
from exo.worker.engines.base import ProgressCallback, ShardSpec
from exo.worker.engines.torch.cache import KVCache, RequestBatch, SlotCache
from exo.worker.engines.torch.compile_env import (
    compile_all_at_load,
    compile_wanted,
    saved_graphs_mode,
)
from exo.worker.engines.torch.compiled import CompiledDecoder
from exo.worker.engines.torch.device import Placement, choose_placement, release_scratch_memory
from exo.worker.engines.torch.graphs import SlotDecoder
from exo.worker.engines.torch.llama import LlamaStage, load_stage
from exo.worker.engines.torch.quant import WeightFormat
from exo.worker.engines.torch.saved_graphs import GraphRecipe, SavedGraphs


@dataclass
class TorchRequest:
    cache: KVCache
    # Advanced once per sampled token: the same seed gives the same tokens.
    generator: torch.Generator
    # How often each token id was sampled; kept only for requests with penalties.
    counts: Tensor | None = None


def adjusted(logits: Tensor, sampling: SamplingParams, counts: Tensor | None) -> Tensor:
    """[V] logits with the request's logit_bias and its penalties on the tokens so far."""
    logits = logits.float()
    if sampling.logit_bias:
        ids = torch.tensor([i for i, _ in sampling.logit_bias], device=logits.device)
        bias = torch.tensor([b for _, b in sampling.logit_bias], device=logits.device)
        logits = logits.index_add(-1, ids, bias)
    if counts is not None:
        seen = (counts > 0).float()
        logits = logits - sampling.presence_penalty * seen - sampling.frequency_penalty * counts
    return logits


def sample_top_p(logits: Tensor, top_p: float, generator: torch.Generator) -> Tensor:
    """[V] logits -> [1] id among the most likely tokens whose probabilities sum to top_p."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Keep a token if the mass before it is below top_p (so the top token always stays).
    keep = (torch.cumsum(probs, dim=-1) - probs) < top_p
    choice = torch.multinomial(torch.where(keep, probs, 0.0), 1, generator=generator)
    return order[choice]


class TorchEngine:
    """Layers [start, end) of a Llama-family model in torch (CUDA or CPU)."""

    def __init__(
        self,
        stage: LlamaStage,
        shard: ShardSpec,
        placement: Placement,
        decoder: CompiledDecoder | None = None,
    ) -> None:
        self._stage = stage
        self._shard = shard
        self.placement = placement
        # One-token steps through inductor (the CPU int4 path), else eager.
        self.decoder = decoder

    @classmethod
    def load(
        cls,
        model_dir: Path,
        shard: ShardSpec,
        on_progress: ProgressCallback,
        weights: WeightFormat | None = None,
    ) -> "TorchEngine":
        placement = choose_placement(weights)
        with torch.no_grad():
            stage = load_stage(
                model_dir,
                shard.start_layer,
                shard.end_layer,
                placement.weights,
                placement.activation_dtype,
                placement.device,
                on_progress,
            )
        release_scratch_memory()
        if stage.args.num_hidden_layers != shard.n_layers:
            raise ValueError(
                f"model has {stage.args.num_hidden_layers} layers, shard expects {shard.n_layers}"
            )
        engine = cls(stage, shard, placement)
        # The fast CPU format only: the dense formats are references and stay eager.
        if placement.weights == "int4" and compile_wanted(placement.device):
            saved = None
            if saved_graphs_mode() != "off":
                saved = SavedGraphs(GraphRecipe.of(model_dir, shard, placement.weights))
            engine.decoder = CompiledDecoder(stage, placement.threads, saved)
            # A pipeline stage compiles everything now: a compile while it idles would stall
            # the requests the other stages admit meanwhile (a cold one, over a minute here,
            # past the step timeout that fails them).
            every_bucket = compile_all_at_load() or not shard.is_full
            engine.decoder.prepare(every_bucket=every_bucket)
        return engine

    def idle_work(self) -> bool:
        """Compile one more batch size's decode step (seconds; the runner calls this only
        while it has nothing to serve); False once nothing is left to compile."""
        return self.decoder is not None and self.decoder.compile_next()

    @property
    def stage(self) -> LlamaStage:
        return self._stage

    @property
    def shard(self) -> ShardSpec:
        return self._shard

    @property
    def hidden_size(self) -> int:
        return self._stage.args.hidden_size

    @property
    def context_length(self) -> int:
        return self._stage.args.max_position_embeddings

    def use_cores(self, alone: bool) -> None:
        """Before a step of a stage that shares its node's cores with other stages of its
        instance (`Placement.threads` has two counts): all the cores when no other stage
        can have work (`alone`: this step carries every request the stage holds), else its
        own share. Both counts have compiled graphs (the compiler's guards include torch's
        thread count), so the switch costs nothing."""
        threads = self.placement.threads
        if len(threads) < 2:
            return
        wanted = threads[-1] if alone else threads[0]
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)

    @property
    def device(self) -> torch.device:
        return self.placement.device

    def new_request(self, context_tokens: int, seed: int | None) -> TorchRequest:
        if not 0 < context_tokens <= self.context_length:
            raise ValueError(f"context of {context_tokens} tokens exceeds {self.context_length}")
        with torch.no_grad():
            cache = self._stage.new_cache(context_tokens)
        generator = torch.Generator(self.device)
        generator.manual_seed(secrets.randbits(63) if seed is None else seed)
        return TorchRequest(cache, generator)

    def token_input(self, token_ids: Sequence[int]) -> Tensor:
        return torch.tensor([list(token_ids)], dtype=torch.int64, device=self.device)

    def batch_input(self, token_ids: Sequence[int]) -> Tensor:
        """One token id per request as a batched decode step's input, shape [B, 1]."""
        return torch.tensor([[t] for t in token_ids], dtype=torch.int64, device=self.device)

    def forward(self, x: Tensor, request: TorchRequest) -> Tensor:
        return self.forward_batch(x, [request])

    def forward_batch(self, x: Tensor, requests: Sequence[TorchRequest]) -> Tensor:
        """x [B, L] ids or [B, L, D] hidden, row b for requests[b] -> [B, L, D] hidden, or on
        the last stage [B, vocab] logits. Every request advances by L tokens."""
        if x.shape[0] != len(requests):
            raise ValueError(f"{x.shape[0]} rows for {len(requests)} requests")
        with torch.no_grad():
            batch = RequestBatch([r.cache for r in requests], x.shape[1], self.device)
            if x.shape[1] == 1 and self.decoder is not None:
                return self.decoder(x, batch)
            return self._stage(x, batch)

    def sample(self, logits: Tensor, sampling: SamplingParams, request: TorchRequest) -> Tensor:
        return self.sample_batch(logits, [sampling], [request])

    def sample_batch(
        self,
        logits: Tensor,
        samplings: Sequence[SamplingParams],
        requests: Sequence[TorchRequest],
    ) -> Tensor:
        """[B, vocab] logits -> [B, 1] ids (a valid first-stage input for the next step)."""
        with torch.no_grad():
            if all(s.temperature == 0.0 and not s.adjusted for s in samplings):
                return logits.argmax(dim=-1, keepdim=True)
            rows: list[Tensor] = []
            for row, sampling, request in zip(logits, samplings, requests, strict=True):
                if sampling.adjusted:
                    row = adjusted(row, sampling, request.counts)
                token = self._sample_one(row, sampling, request.generator)
                if sampling.penalized:
                    if request.counts is None:
                        request.counts = torch.zeros(row.shape[-1], device=row.device)
                    request.counts[token] += 1.0
                rows.append(token)
            return torch.stack(rows)

    @staticmethod
    def _sample_one(logits: Tensor, sampling: SamplingParams, generator: torch.Generator) -> Tensor:
        if sampling.temperature == 0.0:
            return logits.argmax(dim=-1, keepdim=True)
        scaled = logits.float() / sampling.temperature
        if sampling.top_p < 1.0:
            return sample_top_p(scaled, sampling.top_p, generator)
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)

    def schedule(self, x: Tensor) -> None:
        # CPU ops run as they are called; CUDA launches are already asynchronous.
        pass

    def schedule_cache(self, request: TorchRequest) -> None:
        pass

    def read_token(self, token: Tensor) -> int:
        return int(token.reshape(-1)[0].item())

    def read_tokens(self, tokens: Tensor) -> list[int]:
        """[B, 1] ids -> B ints with one host sync."""
        host = tokens.reshape(-1).to(device="cpu", dtype=torch.int64).numpy()
        return [int(v) for v in host]

    def release(self, request: TorchRequest) -> None:
        """Free a finished or cancelled request's cache now rather than at garbage collection."""
        request.cache = KVCache([], [])

    def to_numpy(self, x: Tensor) -> npt.NDArray[Any]:
        # numpy has no bfloat16; float32 holds it exactly.
        return np.asarray(x.detach().float().cpu().numpy())

    def from_numpy(self, x: npt.NDArray[Any]) -> Tensor:
        host: Tensor = torch.from_numpy(np.ascontiguousarray(x))  # pyright: ignore[reportUnknownMemberType]
        return host.to(device=self.device, dtype=self.placement.activation_dtype)

    def slot_decoder(self, slots: int, capacity: int) -> SlotDecoder:
        """Fixed-shape decode over `slots` requests (captured as a CUDA graph on CUDA)."""
        args = self._stage.args
        with torch.no_grad():
            cache = SlotCache(
                len(self._stage.layers),
                slots,
                args.num_key_value_heads,
                args.head_dim,
                capacity,
                self.placement.activation_dtype,
                self.device,
            )
            return SlotDecoder(self._stage, cache, use_graph=self.device.type == "cuda")
