# pyright: basic
# Adapter over transformers and mlx_lm, whose model and tokenizer APIs are loosely typed.
"""Reference implementations a conversion is checked against (dev dependencies, lazily imported)."""

from pathlib import Path
from typing import Any


class HfTokenizer:
    """A `transformers` tokenizer, from a GGUF file or from a converted directory."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_gguf(cls, gguf_path: Path) -> "HfTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name))

    @classmethod
    def from_dir(cls, model_dir: Path) -> "HfTokenizer":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)))

    @property
    def eos_token(self) -> str:
        return str(self._tokenizer.eos_token)

    def encode(self, text: str) -> list[int]:
        return [int(token) for token in self._tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids))

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        rendered = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return str(rendered)


class HfGgufModel:
    """`transformers` reading a llama GGUF with its own dequantization, in float32."""

    def __init__(self, model: Any) -> None:
        self._model = model

    @classmethod
    def load(cls, gguf_path: Path) -> "HfGgufModel":
        # from_pretrained(gguf_file=) also needs `accelerate`; this is the same loading path.
        import torch
        from transformers import AutoConfig, LlamaForCausalLM
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config: Any = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = LlamaForCausalLM(config).float().eval()
        loaded = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
        state = {name: torch.as_tensor(tensor) for name, tensor in loaded["tensors"].items()}
        result = model.load_state_dict(state, strict=False)
        # A tied output head has no tensor of its own in the file.
        expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
        if list(result.missing_keys) != expected_missing or result.unexpected_keys:
            raise ValueError(f"GGUF tensors did not fit the model: {result}")
        model.tie_weights()
        return cls(model)

    def greedy(self, prompt: list[int], n_tokens: int) -> list[int]:
        """n_tokens argmax tokens, never stopping at end-of-sequence."""
        import torch

        generated: list[int] = []
        past = None
        feed = prompt
        with torch.no_grad():
            for _ in range(n_tokens):
                output = self._model(torch.tensor([feed]), past_key_values=past, use_cache=True)
                past = output.past_key_values
                generated.append(int(output.logits[0, -1].argmax()))
                feed = [generated[-1]]
        return generated


class MlxLmModel:
    """A converted directory loaded by `mlx_lm`, as mlx-community models are."""

    def __init__(self, model: Any) -> None:
        self._model = model

    @classmethod
    def load(cls, model_dir: Path) -> "MlxLmModel":
        from mlx_lm.utils import load_model

        model, _ = load_model(model_dir)
        return cls(model)

    def quantized_modules(self) -> dict[str, tuple[int, int]]:
        """(bits, group_size) of every quantized module, by module path."""
        import mlx.nn as nn

        return {
            path: (int(module.bits), int(module.group_size))
            for path, module in self._model.named_modules()
            if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        }

    def greedy(self, prompt: list[int], n_tokens: int) -> list[int]:
        """n_tokens argmax tokens, never stopping at end-of-sequence."""
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(self._model)
        generated: list[int] = []
        feed = prompt
        for _ in range(n_tokens):
            logits = self._model(mx.array([feed]), cache=cache)
            token: Any = mx.argmax(logits[0, -1]).item()
            generated.append(int(token))
            feed = [generated[-1]]
        return generated
