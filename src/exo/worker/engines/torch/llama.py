"""Llama-family model for one pipeline stage, in torch: layers [start, end), cache passed in.

Covers Llama 2/3.x (llama3 RoPE scaling), SmolLM2, Mistral, Qwen2.5 (q/k/v bias) and
Qwen3 (RMSNorm over each q/k head). Reads a Hugging Face style directory (config.json +
safetensors, dense or quantized the MLX affine way). The first stage embeds, the last
applies the final norm and the output head (the embedding again when tied).

q/k/v and gate/up are fused into one matmul each at load: a decode step is a few hundred
small kernels, so every call saved is per-token time saved.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor

from exo.models.architecture import ModelArgs, layer_of, rope_inverse_frequencies
from exo.worker.engines.torch import cpu_ops
from exo.worker.engines.torch.cache import AttentionBatch, KVCache
from exo.worker.engines.torch.quant import (
    AffineWeight,
    DenseEmbedding,
    Int4Linear,
    Linear,
    QmmLinear,
    QuantizedEmbedding,
    WeightFormat,
    make_linear,
    unpack_mlx,
)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies [head_dim / 2], float32."""
    return torch.tensor(rope_inverse_frequencies(args), dtype=torch.float32)


@dataclass(frozen=True)
class Rope:
    cos: Tensor  # [B, L, 1, head_dim / 2]
    sin: Tensor

    @classmethod
    def at(cls, positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> "Rope":
        angles = (positions[..., None].float() * inv_freq)[..., None, :]
        return cls(angles.cos().to(dtype), angles.sin().to(dtype))

    def __call__(self, x: Tensor) -> Tensor:
        """Rotate [B, L, heads, head_dim] (rotate-half layout, as transformers)."""
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * self.cos - x2 * self.sin, x2 * self.cos + x1 * self.sin), dim=-1)


class RMSNorm:
    def __init__(self, weight: Tensor, eps: float) -> None:
        self.weight = weight
        self.eps = eps

    def __call__(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Attention:
    def __init__(
        self,
        args: ModelArgs,
        qkv_proj: Linear,
        o_proj: Linear,
        q_norm: RMSNorm | None,
        k_norm: RMSNorm | None,
    ) -> None:
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.qkv_proj = qkv_proj
        self.o_proj = o_proj
        self.q_norm = q_norm
        self.k_norm = k_norm
        # Decode attention through our kernel (`cpu_ops.decode_attention`): set at load.
        self.kernel = False

    def project(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """Normed hidden [B, L, D] -> rotated q [B, heads, L, d], k and v [B, kv_heads, L, d]."""
        b, length, _ = x.shape
        qkv = self.qkv_proj(x).view(b, length, -1, self.head_dim)
        n_qk = self.n_heads + self.n_kv_heads
        qk, v = qkv[:, :, :n_qk], qkv[:, :, n_qk:]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)
        # q and k rotate in one call: they are adjacent heads of the fused projection.
        qk = rope(qk)
        q, k = qk[:, :, : self.n_heads], qk[:, :, self.n_heads :]
        return q.transpose(1, 2), k.transpose(1, 2), v.to(q.dtype).transpose(1, 2)

    def output(self, attended: Tensor) -> Tensor:
        """Attention output [B, heads, L, d] -> [B, L, D]."""
        b, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(b, length, -1))


class MLP:
    def __init__(self, gate_up_proj: Linear, down_proj: Linear) -> None:
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def __call__(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock:
    def __init__(
        self, attention: Attention, mlp: MLP, input_norm: RMSNorm, post_attention_norm: RMSNorm
    ) -> None:
        self.self_attn = attention
        self.mlp = mlp
        self.input_layernorm = input_norm
        self.post_attention_layernorm = post_attention_norm

    def __call__(self, x: Tensor, rope: Rope, batch: AttentionBatch, layer: int) -> Tensor:
        q, k, v = self.before_attention(x, rope)
        attn = self.self_attn
        return self.after_attention(x, batch.attend(layer, q, k, v, attn.scale, attn.kernel))

    # The two halves around the cache (a compiled decode step attends in between itself).
    def before_attention(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        return self.self_attn.project(self.input_layernorm(x), rope)

    def after_attention(self, x: Tensor, attended: Tensor) -> Tensor:
        h = x + self.self_attn.output(attended)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStage:
    """Layers [start, end): embeds on the first stage, norm + head on the last."""

    def __init__(
        self,
        args: ModelArgs,
        start: int,
        end: int,
        layers: list[TransformerBlock],
        embed_tokens: Callable[[Tensor], Tensor] | None,
        norm: RMSNorm | None,
        lm_head: Linear | None,
        activation_dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.args = args
        self.start = start
        self.end = end
        self.layers = layers
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.activation_dtype = activation_dtype
        self.device = device
        self.inv_freq = rope_frequencies(args).to(device)

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.args.num_hidden_layers

    def __call__(self, x: Tensor, batch: AttentionBatch) -> Tensor:
        """Token ids [B, L] (first stage) or hidden [B, L, D] -> hidden [B, L, D], or on the
        last stage float32 logits [B, vocab] of the last position."""
        out = self.forward(x, batch)
        batch.advance()
        return out

    def forward(self, x: Tensor, batch: AttentionBatch) -> Tensor:
        """`__call__` without advancing the batch."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x.to(self.activation_dtype)
        rope = Rope.at(batch.positions, self.inv_freq, self.activation_dtype)
        for index, layer in enumerate(self.layers):
            h = layer(h, rope, batch, index)
        return self.head(h) if self.is_last else h

    def new_cache(self, capacity: int) -> KVCache:
        """Keys and values of one request for every layer of this stage, `capacity` tokens."""
        args = self.args
        return KVCache.allocate(
            len(self.layers),
            args.num_key_value_heads,
            args.head_dim,
            capacity,
            self.activation_dtype,
            self.device,
        )

    def head(self, h: Tensor) -> Tensor:
        """Hidden [B, L, D] -> float32 logits [B, vocab] of the last position only (the head
        is the widest matmul)."""
        if self.norm is None or self.lm_head is None:
            raise ValueError("only the last stage has the output head")
        return self.lm_head(self.norm(h[:, -1, :])).float()


class _Checkpoint:
    """The stage's tensors from the safetensors files, by Hugging Face name."""

    def __init__(self, model_dir: Path, wanted: Callable[[str], bool]) -> None:
        self.tensors: dict[str, Tensor] = {}
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors in {model_dir}")
        for file in files:
            # safetensors' API is untyped: keep it to these lines.
            opened: Any = safe_open(str(file), framework="pt")
            with opened as handle:
                names: list[str] = list(handle.keys())
                for name in filter(wanted, names):
                    self.tensors[name] = handle.get_tensor(name)

    def weight(self, module: str, group_size: int) -> AffineWeight | Tensor:
        """A module's weight: unpacked if quantized, else the dense tensor."""
        weight = self.tensors[f"{module}.weight"]
        if f"{module}.scales" not in self.tensors:
            return weight
        scales, biases = self.tensors[f"{module}.scales"], self.tensors[f"{module}.biases"]
        return unpack_mlx(weight, scales, biases, group_size)

    def get(self, name: str) -> Tensor | None:
        return self.tensors.get(name)


def _fused(parts: list[AffineWeight | Tensor]) -> AffineWeight | Tensor:
    affine = [p for p in parts if isinstance(p, AffineWeight)]
    if len(affine) == len(parts):
        return AffineWeight.concat(affine)
    # Mixed quantization: fuse dense.
    return torch.cat([p.dequantize() if isinstance(p, AffineWeight) else p.float() for p in parts])


def _fused_bias(parts: list[Tensor | None]) -> Tensor | None:
    present = [p for p in parts if p is not None]
    return torch.cat(present).float() if len(present) == len(parts) else None


def _group_size(config: dict[str, Any]) -> int:
    quantization: Any = config.get("quantization") or config.get("quantization_config")
    if isinstance(quantization, dict) and "group_size" in quantization:
        return int(quantization["group_size"])  # pyright: ignore[reportUnknownArgumentType]
    return 64


def load_stage(
    model_dir: Path,
    start: int,
    end: int,
    weights: WeightFormat,
    activation_dtype: torch.dtype,
    device: torch.device,
    on_progress: Callable[[float], None],
) -> LlamaStage:
    """Build the stage from only its own tensors; progress is reported per built layer."""
    config: dict[str, Any] = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    args = ModelArgs.from_config(config)
    if not 0 <= start < end <= args.num_hidden_layers:
        raise ValueError(f"invalid layer range [{start}, {end}) of {args.num_hidden_layers}")
    is_first, is_last = start == 0, end == args.num_hidden_layers
    needs_embedding = is_first or (is_last and args.tie_word_embeddings)

    def wanted(name: str) -> bool:
        layer = layer_of(name)
        if layer is not None:
            return start <= layer < end
        if name.startswith("model.embed_tokens."):
            return needs_embedding
        return is_last and name.startswith(("model.norm.", "lm_head."))

    checkpoint = _Checkpoint(model_dir, wanted)
    group_size = _group_size(config)
    parts = list(range(start, end))
    steps = len(parts) + 1

    def linear(modules: list[str], has_bias: bool) -> Linear:
        weight = _fused([checkpoint.weight(m, group_size) for m in modules])
        bias = _fused_bias([checkpoint.get(f"{m}.bias") for m in modules]) if has_bias else None
        return make_linear(weight, bias, weights, device)

    def norm(name: str) -> RMSNorm:
        tensor = checkpoint.tensors[f"{name}.weight"]
        # A copy: a view would keep the whole mapped checkpoint file resident.
        weight = tensor.to(device=device, dtype=activation_dtype, copy=True)
        return RMSNorm(weight, args.rms_norm_eps)

    layers: list[TransformerBlock] = []
    for done, index in enumerate(parts, start=1):
        prefix = f"model.layers.{index}"
        attn = f"{prefix}.self_attn"
        attention = Attention(
            args,
            linear([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"], args.qkv_bias),
            linear([f"{attn}.o_proj"], args.o_bias),
            norm(f"{attn}.q_norm") if args.qk_norm else None,
            norm(f"{attn}.k_norm") if args.qk_norm else None,
        )
        mlp = MLP(
            linear([f"{prefix}.mlp.gate_proj", f"{prefix}.mlp.up_proj"], args.mlp_bias),
            linear([f"{prefix}.mlp.down_proj"], args.mlp_bias),
        )
        layers.append(
            TransformerBlock(
                attention,
                mlp,
                norm(f"{prefix}.input_layernorm"),
                norm(f"{prefix}.post_attention_layernorm"),
            )
        )
        # Drop each layer's source tensors as soon as it is built: peak memory stays low.
        for name in [n for n in checkpoint.tensors if layer_of(n) == index]:
            del checkpoint.tensors[name]
        on_progress(done / steps)

    embed_tokens: Callable[[Tensor], Tensor] | None = None
    lm_head: Linear | None = None
    if needs_embedding:
        table = checkpoint.weight("model.embed_tokens", group_size)
        if is_first:
            embed_tokens = _embedding(table, activation_dtype, device)
        if is_last and args.tie_word_embeddings:
            lm_head = make_linear(table, None, weights, device)
    if is_last and not args.tie_word_embeddings:
        lm_head = make_linear(checkpoint.weight("lm_head", group_size), None, weights, device)
    if weights == "int4" and device.type == "cpu" and activation_dtype == torch.float32:
        # Our decode attention kernel comes with our matmul kernel (the same extension).
        kernel = cpu_ops.attention_fits(args.head_dim) and cpu_ops.available()
        for layer in layers:
            layer.self_attn.kernel = kernel
    stage = LlamaStage(
        args,
        start,
        end,
        layers,
        embed_tokens,
        norm("model.norm") if is_last else None,
        lm_head,
        activation_dtype,
        device,
    )
    on_progress(1.0)
    return stage


def _embedding(
    table: AffineWeight | Tensor, dtype: torch.dtype, device: torch.device
) -> Callable[[Tensor], Tensor]:
    if isinstance(table, AffineWeight):
        if device.type == "cpu":
            return QuantizedEmbedding(table, dtype)
        table = table.dequantize()
    return DenseEmbedding(table.to(device=device, dtype=dtype), dtype)


def quantized_layers(stage: LlamaStage) -> Iterator[Int4Linear | QmmLinear]:
    """The stage's quantized matmuls (for the calibration bench's byte count)."""
    for layer in stage.layers:
        for linear in (
            layer.self_attn.qkv_proj,
            layer.self_attn.o_proj,
            layer.mlp.gate_up_proj,
            layer.mlp.down_proj,
        ):
            if isinstance(linear, Int4Linear | QmmLinear):
                yield linear
