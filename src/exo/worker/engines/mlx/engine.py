"""The mlx engine: one Llama stage behind the `Engine` interface."""

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import numpy as np
import numpy.typing as npt

from exo.shared.types.chat import SamplingParams
from exo.worker.engines.base import ProgressCallback, ShardSpec
from exo.worker.engines.mlx.llama import KVCache, LlamaStage, load_stage


@dataclass
class MlxRequest:
    cache: list[KVCache]
    # Split once per sampled token: the same seed gives the same tokens.
    key: mx.array
    # How often each token id was sampled; kept only for requests with penalties.
    counts: mx.array | None = None


def _adjusted(logits: mx.array, sampling: SamplingParams, counts: mx.array | None) -> mx.array:
    """Logits with the request's logit_bias and its penalties on the tokens so far."""
    logits = logits.astype(mx.float32)
    if sampling.logit_bias:
        ids = mx.array([i for i, _ in sampling.logit_bias], dtype=mx.int32)
        bias = mx.array([b for _, b in sampling.logit_bias], dtype=mx.float32)
        dense = mx.zeros((logits.shape[-1],), dtype=mx.float32).at[ids].add(bias)  # pyright: ignore[reportUnknownMemberType]
        logits = logits + dense
    if counts is not None:
        seen = (counts > 0).astype(mx.float32)
        logits = logits - sampling.presence_penalty * seen - sampling.frequency_penalty * counts
    return logits


def _sample_top_p(logits: mx.array, top_p: float, key: mx.array) -> mx.array:
    """Sample among the most likely tokens whose probabilities sum to at least top_p."""
    order = mx.argsort(-logits, axis=-1)
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    sorted_probs = mx.softmax(sorted_logits, axis=-1)
    # Keep a token if the mass before it is below top_p (so the top token always stays).
    keep = (mx.cumsum(sorted_probs, axis=-1) - sorted_probs) < top_p
    choice = mx.random.categorical(mx.where(keep, sorted_logits, -mx.inf), key=key)
    return mx.take_along_axis(order, mx.expand_dims(choice, -1), axis=-1)


class MlxEngine:
    """Layers [start, end) of a Llama model in MLX (CPU on Linux, Metal on macOS)."""

    def __init__(self, stage: LlamaStage, shard: ShardSpec) -> None:
        self._stage = stage
        self._shard = shard

    @classmethod
    def load(cls, model_dir: Path, shard: ShardSpec, on_progress: ProgressCallback) -> "MlxEngine":
        stage = load_stage(model_dir, shard.start_layer, shard.end_layer, on_progress)
        if stage.args.num_hidden_layers != shard.n_layers:
            raise ValueError(
                f"model has {stage.args.num_hidden_layers} layers, shard expects {shard.n_layers}"
            )
        return cls(stage, shard)

    @property
    def shard(self) -> ShardSpec:
        return self._shard

    @property
    def hidden_size(self) -> int:
        return self._stage.args.hidden_size

    @property
    def context_length(self) -> int:
        return self._stage.args.max_position_embeddings

    def new_request(self, context_tokens: int, seed: int | None) -> MlxRequest:
        if not 0 < context_tokens <= self.context_length:
            raise ValueError(f"context of {context_tokens} tokens exceeds {self.context_length}")
        seed = secrets.randbits(63) if seed is None else seed
        return MlxRequest(self._stage.make_cache(context_tokens), mx.random.key(seed))

    def token_input(self, token_ids: Sequence[int]) -> mx.array:
        return mx.array([list(token_ids)], dtype=mx.int32)

    def forward(self, x: mx.array, request: MlxRequest) -> mx.array:
        return self._stage(x, request.cache)

    def sample(self, logits: mx.array, sampling: SamplingParams, request: MlxRequest) -> mx.array:
        if sampling.adjusted:
            logits = _adjusted(logits, sampling, request.counts)
        token = self._choose(logits, sampling, request)
        if sampling.penalized:
            counts = request.counts
            if counts is None:
                counts = mx.zeros((logits.shape[-1],), dtype=mx.float32)
            request.counts = counts.at[mx.flatten(token)].add(1.0)  # pyright: ignore[reportUnknownMemberType]
        return token

    def _choose(self, logits: mx.array, sampling: SamplingParams, request: MlxRequest) -> mx.array:
        if sampling.temperature == 0.0:
            return mx.argmax(logits, axis=-1, keepdims=True)
        keys = mx.random.split(request.key)
        request.key, key = keys[0], keys[1]
        scaled = logits.astype(mx.float32) / sampling.temperature
        if sampling.top_p < 1.0:
            return _sample_top_p(scaled, sampling.top_p, key)
        return mx.expand_dims(mx.random.categorical(scaled, key=key), -1)

    def schedule(self, x: mx.array) -> None:
        mx.async_eval(x)  # pyright: ignore[reportUnknownMemberType]

    def schedule_cache(self, request: MlxRequest) -> None:
        states = [a for c in request.cache for a in (c.keys, c.values) if a is not None]
        mx.async_eval(states)  # pyright: ignore[reportUnknownMemberType]

    def read_token(self, token: mx.array) -> int:
        value = token.item()
        assert isinstance(value, int)
        return value

    def to_numpy(self, x: mx.array) -> npt.NDArray[Any]:
        # numpy has no bfloat16; float32 holds it exactly.
        if x.dtype == mx.bfloat16:
            x = x.astype(mx.float32)
        return cast(npt.NDArray[Any], np.asarray(x))

    def from_numpy(self, x: npt.NDArray[Any]) -> mx.array:
        # The sender's float16/float32 is kept: MLX promotes as the layers need.
        return mx.array(x)
