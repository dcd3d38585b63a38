"""Llama-family model for one pipeline stage, in MLX: layers [start, end), cache passed in.

Covers what the torch engine does (`exo.models.architecture.FAMILIES`: Llama 2/3.x with
linear or llama3 RoPE scaling, SmolLM2, Mistral, Qwen2.5's q/k/v bias, Qwen3's RMSNorm
over each q/k head), from the same reading of the config. Reads a Hugging Face style directory
(config.json + safetensors, optionally quantized the mlx-community way). The first stage
holds the embedding, the last the final norm and the output head (the embedding again when
tied); other stages hold only their layers.
"""

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn

from exo.models.architecture import ModelArgs, rope_inverse_frequencies


class KVCache:
    """Keys and values of one layer for one request, preallocated to the request's context."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.offset = 0
        self.keys: mx.array | None = None
        self.values: mx.array | None = None

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        batch, n_kv_heads, length, head_dim = keys.shape
        if self.offset + length > self.capacity:
            raise ValueError(f"context of {self.capacity} tokens is full")
        if self.keys is None or self.values is None:
            shape = (batch, n_kv_heads, self.capacity, head_dim)
            self.keys = mx.zeros(shape, keys.dtype)
            self.values = mx.zeros(shape, values.dtype)
        start, self.offset = self.offset, self.offset + length
        self.keys[..., start : self.offset, :] = keys
        self.values[..., start : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


@partial(mx.compile, shapeless=True)
def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return gate * mx.sigmoid(gate) * x


def _heads(x: mx.array, n_heads: int) -> mx.array:
    """[B, L, H * D] -> [B, H, L, D]."""
    batch, length, _ = x.shape
    return mx.transpose(mx.reshape(x, (batch, length, n_heads, -1)), (0, 2, 1, 3))


class _Rope(nn.Module):
    """Rotate-half RoPE at the config's frequencies (scaled ones passed to the kernel as periods)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.dims = args.head_dim
        scaled = args.rope_kind != "default"
        # Unscaled RoPE keeps the kernel's own frequencies from the base.
        self.base = None if scaled else args.rope_theta
        # "_": not a parameter of the checkpoint.
        self._periods = (
            mx.array(1.0 / rope_inverse_frequencies(args), dtype=mx.float32) if scaled else None
        )

    def __call__(self, x: mx.array, offset: int) -> mx.array:
        return mx.fast.rope(
            x,
            self.dims,
            traditional=False,
            base=self.base,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        dim, head_dim = args.hidden_size, args.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=args.o_bias)
        if args.qk_norm:
            self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
            self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.qk_norm = args.qk_norm
        self.rope = _Rope(args)

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache) -> mx.array:
        batch, length, _ = x.shape
        q = _heads(self.q_proj(x), self.n_heads)
        k = _heads(self.k_proj(x), self.n_kv_heads)
        v = _heads(self.v_proj(x), self.n_kv_heads)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rope(q, cache.offset)
        k = self.rope(k, cache.offset)
        k, v = cache.update_and_fetch(k, v)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        out = mx.reshape(mx.transpose(out, (0, 2, 1, 3)), (batch, length, -1))
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: str | None, cache: KVCache) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStage(nn.Module):
    """Layers [start, end): embeds on the first stage, norm + head on the last."""

    def __init__(self, args: ModelArgs, start: int, end: int) -> None:
        super().__init__()
        self.args = args
        self.start = start
        self.end = end
        self.is_first = start == 0
        self.is_last = end == args.num_hidden_layers
        if self.is_first or (self.is_last and args.tie_word_embeddings):
            self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(start, end)]
        if self.is_last:
            self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
            if not args.tie_word_embeddings:
                self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def make_cache(self, capacity: int) -> list[KVCache]:
        return [KVCache(capacity) for _ in self.layers]

    def __call__(self, x: mx.array, cache: list[KVCache]) -> mx.array:
        """Token ids [B, L] (first stage) or hidden [B, L, D] -> hidden, or last-token logits."""
        h = self.embed_tokens(x) if self.is_first else x
        mask = "causal" if h.shape[1] > 1 else None
        for layer, layer_cache in zip(self.layers, cache, strict=True):
            h = layer(h, mask, layer_cache)
        if not self.is_last:
            return h
        # Only the last position's logits are needed; the head is the widest matmul.
        h = self.norm(h[:, -1, :])
        if self.args.tie_word_embeddings:
            logits: mx.array = cast(Any, self.embed_tokens).as_linear(h)
            return logits
        return self.lm_head(h)

    def hf_name(self, local_name: str) -> str:
        """Our parameter or module path -> the Hugging Face name in the checkpoint."""
        if local_name.startswith("layers."):
            _, index, rest = local_name.split(".", 2)
            return f"model.layers.{int(index) + self.start}.{rest}"
        if local_name.startswith("lm_head"):
            return local_name
        return f"model.{local_name}"

    def wants(self, hf_name: str) -> str | None:
        """The local name of a checkpoint tensor if this stage holds it, else None."""
        if hf_name.startswith("model.layers."):
            _, _, index, rest = hf_name.split(".", 3)
            layer = int(index)
            if self.start <= layer < self.end:
                return f"layers.{layer - self.start}.{rest}"
            return None
        if hf_name.startswith("model.embed_tokens."):
            keep = self.is_first or (self.is_last and self.args.tie_word_embeddings)
            return hf_name.removeprefix("model.") if keep else None
        if hf_name.startswith("model.norm."):
            return hf_name.removeprefix("model.") if self.is_last else None
        if hf_name.startswith("lm_head."):
            return hf_name if self.is_last and not self.args.tie_word_embeddings else None
        return None


def _quantize(stage: LlamaStage, quantization: dict[str, Any], names: set[str]) -> None:
    """Swap Linear/Embedding for their quantized forms where the checkpoint has scales."""

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        hf = stage.hf_name(path)
        override = quantization.get(hf)
        if isinstance(override, dict):
            return override  # pyright: ignore[reportUnknownVariableType]
        if override is False:
            return False
        return hasattr(module, "to_quantized") and f"{path}.scales" in names

    nn.quantize(  # pyright: ignore[reportUnknownMemberType]
        stage,
        group_size=int(quantization["group_size"]),
        bits=int(quantization["bits"]),
        mode=str(quantization.get("mode", "affine")),
        class_predicate=predicate,
    )


def load_stage(
    model_dir: Path, start: int, end: int, on_progress: Callable[[float], None]
) -> LlamaStage:
    """Build the stage and load only its tensors; progress is reported per loaded layer."""
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    args = ModelArgs.from_config(config)
    if not 0 <= start < end <= args.num_hidden_layers:
        raise ValueError(f"invalid layer range [{start}, {end}) of {args.num_hidden_layers}")
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors in {model_dir}")
    stage = LlamaStage(args, start, end)
    weights: dict[str, mx.array] = {}
    for file in files:
        # mx.load maps the file lazily: tensors of other stages are never read.
        loaded = mx.load(str(file))
        if not isinstance(loaded, dict):
            raise ValueError(f"{file} holds no named tensors")
        for name, tensor in loaded.items():
            if (local := stage.wants(name)) is not None:
                weights[local] = tensor
    quantization = config.get("quantization") or config.get("quantization_config")
    if isinstance(quantization, dict) and "bits" in quantization:
        _quantize(stage, quantization, set(weights))  # pyright: ignore[reportUnknownArgumentType]
    stage.load_weights(list(weights.items()), strict=True)
    stage.eval()
    # Materialize piece by piece so the caller sees progress.
    parts: list[nn.Module] = list(stage.layers)
    for name in ("embed_tokens", "norm", "lm_head"):
        if isinstance(part := getattr(stage, name, None), nn.Module):
            parts.append(part)
    for i, part in enumerate(parts, start=1):
        mx.eval(part.parameters())  # pyright: ignore[reportUnknownMemberType]
        on_progress(i / len(parts))
    return stage
