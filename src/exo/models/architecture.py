"""The Llama family's shape, read from a Hugging Face `config.json`: one reading for every engine.

Both engines run the same families (Llama 2/3.x, SmolLM2, Mistral, Qwen2.5, Qwen3) with the
same RoPE scalings, so what a config means is decided here once, in numpy, and each engine
builds its layers from `ModelArgs`. An engine never guesses a default the other reads
differently (tied embeddings, the Qwen biases, Mistral's window).
"""

import math
import re
from dataclasses import dataclass
from typing import Any, cast, get_args

import numpy as np
import numpy.typing as npt

from exo.shared.types.models import ModelFamily

FAMILIES: tuple[str, ...] = get_args(ModelFamily)
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelArgs:
    model_type: ModelFamily
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    rope_theta: float
    rope_scaling: dict[str, Any]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelArgs":
        named = str(config.get("model_type", "llama"))
        if named not in FAMILIES:
            raise ValueError(
                f"model_type {named!r} is not one exo runs (it runs {', '.join(FAMILIES)})"
            )
        model_type = cast(ModelFamily, named)
        if config.get("rope_traditional"):
            # An mlx-lm-only key (interleaved pairs); both engines rotate halves, as every
            # Hugging Face checkpoint of these families does.
            raise NotImplementedError(
                "rope_traditional (interleaved RoPE) is not supported: both engines rotate "
                "halves, as Hugging Face checkpoints of these families do; it waits for a "
                "checkpoint that needs it"
            )
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        context = int(config.get("max_position_embeddings") or 2048)
        # Mistral's sliding window is not implemented: cap the context at the window instead.
        window = config.get("sliding_window")
        if model_type == "mistral" and isinstance(window, int) and window < context:
            context = window
        attention_bias = bool(config.get("attention_bias", False))
        # transformers >= 5 writes rope_parameters (theta included) instead of the two keys.
        rope: dict[str, Any] = dict(
            config.get("rope_parameters") or config.get("rope_scaling") or {}
        )
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        args = cls(
            model_type=model_type,
            hidden_size=hidden,
            num_hidden_layers=int(config["num_hidden_layers"]),
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config["rms_norm_eps"]),
            vocab_size=int(config["vocab_size"]),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=context,
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v bias and no o_proj bias; Llama's flag covers all four.
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
        )
        # An unsupported scaling fails at load, not at the first request.
        rope_inverse_frequencies(args)
        return args

    @property
    def rope_kind(self) -> str:
        return str(self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default")))


def layer_of(tensor_name: str) -> int | None:
    """The layer a checkpoint tensor belongs to (`model.layers.<n>.…`), None outside layers."""
    match = _LAYER.match(tensor_name)
    return None if match is None else int(match.group(1))


def rope_inverse_frequencies(args: ModelArgs) -> npt.NDArray[np.float64]:
    """RoPE's inverse frequencies [head_dim / 2], after the config's scaling (transformers' formulas)."""
    dim = args.head_dim
    inv_freq: npt.NDArray[np.float64] = 1.0 / (
        args.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    )
    scaling, kind = args.rope_scaling, args.rope_kind
    if kind == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old_context = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
        return np.where(medium, blended, scaled)
    # yarn, dynamic NTK and longrope wait for a model family that needs them by default
    # (Qwen's yarn is opt-in; longrope is Phi-3's, not a family exo runs).
    raise NotImplementedError(
        f"rope_scaling {scaling} is not supported (default, linear and llama3 are; yarn, "
        "dynamic NTK and longrope wait for a model family that ships with them)"
    )
