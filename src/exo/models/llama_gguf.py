"""A llama GGUF's hyperparameters and tensors, renamed and reordered the Hugging Face way."""

import re
from collections import Counter
from collections.abc import Iterator

import numpy as np
from numpy.typing import NDArray
from pydantic import Field

from exo.models.gguf_reader import GgufFile
from exo.shared.types.base import Frozen

# MLX reads every GGUF block format it keeps quantized (Q4_0, Q4_1, Q8_0) with groups of 32.
GGUF_GROUP_SIZE = 32

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TENSOR = re.compile(
    r"^(?:blk\.(?P<layer>\d+)\.)?(?P<base>[a-z_]+)\.(?P<part>weight|scales|biases)$"
)


class LlamaHyperparameters(Frozen):
    n_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    rms_norm_eps: float = Field(gt=0)
    rope_theta: float = Field(gt=0)
    context_length: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    bos_token_id: int = Field(ge=0)
    eos_token_id: int = Field(ge=0)
    tie_word_embeddings: bool


class Quantization(Frozen):
    """Bits of one quantized module (group size is always GGUF_GROUP_SIZE)."""

    bits: int = Field(gt=0)
    group_size: int = Field(gt=0)


def read_hyperparameters(gguf: GgufFile) -> LlamaHyperparameters:
    architecture = gguf.text("general.architecture")
    if architecture != "llama":
        raise ValueError(f"only llama GGUF files convert, this one is {architecture!r}")
    hidden = gguf.integer("llama.embedding_length")
    n_heads = gguf.integer("llama.attention.head_count")
    head_dim = (
        gguf.integer("llama.attention.key_length")
        if "llama.attention.key_length" in gguf.metadata
        else hidden // n_heads
    )
    vocab = (
        gguf.integer("llama.vocab_size")
        if "llama.vocab_size" in gguf.metadata
        else len(gguf.texts("tokenizer.ggml.tokens"))
    )
    return LlamaHyperparameters(
        n_layers=gguf.integer("llama.block_count"),
        hidden_size=hidden,
        intermediate_size=gguf.integer("llama.feed_forward_length"),
        n_heads=n_heads,
        n_kv_heads=gguf.integer("llama.attention.head_count_kv"),
        head_dim=head_dim,
        rms_norm_eps=_shortest(gguf.real("llama.attention.layer_norm_rms_epsilon")),
        rope_theta=_shortest(gguf.real("llama.rope.freq_base")),
        context_length=gguf.integer("llama.context_length"),
        vocab_size=vocab,
        bos_token_id=gguf.integer("tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf.integer("tokenizer.ggml.eos_token_id"),
        tie_word_embeddings="output.weight" not in gguf.tensors,
    )


def hf_name(gguf_name: str) -> str:
    match = _TENSOR.match(gguf_name)
    if match is None:
        raise ValueError(f"unexpected tensor in a llama GGUF: {gguf_name}")
    layer, base, part = match.group("layer"), match.group("base"), match.group("part")
    names = _GLOBAL_NAMES if layer is None else _LAYER_NAMES
    if base not in names:
        raise ValueError(f"unexpected tensor in a llama GGUF: {gguf_name}")
    prefix = "" if layer is None else f"model.layers.{layer}."
    return f"{prefix}{names[base]}.{part}"


def hf_tensors(
    gguf: GgufFile, hparams: LlamaHyperparameters
) -> Iterator[tuple[str, NDArray[np.generic]]]:
    """Every tensor under its HF name, q/k rows back in HF order, in the file's order."""
    for name, tensor in gguf.tensors.items():
        base = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if base == "attn_q":
            yield hf_name(name), _unpermute_rows(tensor, hparams.n_heads)
        elif base == "attn_k":
            yield hf_name(name), _unpermute_rows(tensor, hparams.n_kv_heads)
        else:
            yield hf_name(name), tensor


def module_quantization(gguf: GgufFile) -> dict[str, Quantization]:
    """Bits per quantized module, keyed by HF module path; dense modules are absent."""
    found: dict[str, Quantization] = {}
    for name, scales in gguf.tensors.items():
        if not name.endswith(".scales"):
            continue
        weight = gguf.tensors[name.removesuffix(".scales") + ".weight"]
        in_features = scales.shape[1] * GGUF_GROUP_SIZE
        # Packed uint32 columns hold in_features * bits bits.
        bits = weight.shape[1] * 32 // in_features
        found[hf_name(name).removesuffix(".scales")] = Quantization(
            bits=bits, group_size=GGUF_GROUP_SIZE
        )
    return found


def default_quantization(modules: dict[str, Quantization]) -> Quantization | None:
    """The most common setting; the others become per-module overrides."""
    counts = Counter(modules.values())
    return counts.most_common(1)[0][0] if counts else None


def _shortest(stored: float) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; write the value meant.
    return float(str(np.float32(stored)))


def _unpermute_rows(tensor: NDArray[np.generic], n_heads: int) -> NDArray[np.generic]:
    # llama.cpp interleaves each head's rows for its RoPE; quantization is per row, so the
    # same row order applies to the packed weight, its scales and its biases.
    rows = tensor.shape[0]
    half = rows // n_heads // 2
    grouped = tensor.reshape(n_heads, half, 2, *tensor.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(tensor.shape))
