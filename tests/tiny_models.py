"""Tiny random models of every family the engines run, against transformers' own forward
(tests/test_torch_engine.py and tests/test_mlx_engine.py run these on their engines)."""

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from exo.worker.engines.base import Engine

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
}

FAMILY_CASES = pytest.mark.parametrize(
    ("model_type", "extra"),
    [
        ("llama", {"tie_word_embeddings": False}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                }
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
        ("mistral", {}),
        ("qwen2", {"tie_word_embeddings": True}),
        ("qwen3", {}),
    ],
)

# A prefill, a chunk after cached tokens, then single-token steps.
_FEEDS = ([3, 17, 99, 42], [5, 64], [7], [11])


def save_tiny(model_type: str, out: Path, **extra: Any) -> Any:
    """A random transformers model of the family, saved as a Hugging Face directory."""
    # transformers is untyped: everything it returns is Any here.
    transformers: Any = __import__("transformers")
    config = transformers.AutoConfig.for_model(model_type, **TINY_CONFIG, **extra)
    torch.manual_seed(0)  # pyright: ignore[reportUnknownMemberType]
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    # Non-trivial norms and biases, so that their loading is checked too.
    with torch.no_grad():
        parameters: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
        for name, param in parameters:
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(out))
    return model


def assert_logits_match(engine: Engine[Any, Any], reference: Any) -> None:
    """The engine's last-position logits equal transformers' after each feed (float32)."""
    request = engine.new_request(16, seed=0)
    seen: list[int] = []
    for feed in _FEEDS:
        seen += feed
        ours = engine.to_numpy(engine.forward(engine.token_input(feed), request))
        with torch.no_grad():
            theirs = reference(torch.tensor([seen])).logits[:, -1].float().numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4, err_msg=str(len(seen)))
