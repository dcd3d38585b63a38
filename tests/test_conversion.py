"""The built-in model's conversion, checked against Hugging Face transformers reading the GGUF."""

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from exo.models.builtin import builtin_gguf_path
from exo.models.convert import MARKER_NAME, convert_gguf, read_record
from exo.models.reference import HfGgufModel, HfTokenizer, MlxLmModel

pytestmark = pytest.mark.slow

N_NEW_TOKENS = 32
CONVERSATION = [
    {"role": "user", "content": "Write a short story about a lighthouse keeper."},
    {"role": "assistant", "content": "The keeper climbed the stairs at dusk."},
]
TOKENIZER_SAMPLES = [
    "12345 and 3.14159, 2024-11-23 x1y22z333",
    "naïve café 日本語 🚀 Ünïcödé — “quotes”",
    "def f(x):\n    return x**2  # square\n\n\ttab",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "  lots   of    spaces  ",
    "'s 're I'll don't",
]


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("models") / "smollm2"
    convert_gguf(builtin_gguf_path(), out_dir, None)
    return out_dir


@pytest.fixture(scope="module")
def reference_tokenizer() -> HfTokenizer:
    return HfTokenizer.from_gguf(builtin_gguf_path())


@pytest.fixture(scope="module")
def converted_tokenizer(converted_dir: Path) -> HfTokenizer:
    return HfTokenizer.from_dir(converted_dir)


def test_converted_directory_is_complete_and_loads(converted_dir: Path) -> None:
    names = {path.name for path in converted_dir.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER_NAME,
    }
    assert read_record(converted_dir) is not None
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["tie_word_embeddings"] is True
    quantized = MlxLmModel.load(converted_dir).quantized_modules()
    assert quantized["model.embed_tokens"] == (8, 32)
    layer_modules = {path: q for path, q in quantized.items() if path.startswith("model.layers.")}
    assert len(layer_modules) == 30 * 7
    assert set(layer_modules.values()) == {(4, 32)}


def test_tokenizer_ids_match_transformers(
    converted_dir: Path, converted_tokenizer: HfTokenizer, reference_tokenizer: HfTokenizer
) -> None:
    raw = Tokenizer.from_file(str(converted_dir / "tokenizer.json"))
    for text in TOKENIZER_SAMPLES:
        expected = reference_tokenizer.encode(text)
        assert converted_tokenizer.encode(text) == expected, text
        assert raw.encode(text).ids == expected, text
        assert raw.decode(expected, skip_special_tokens=False) == text


def test_chat_template_renders_like_transformers(
    converted_tokenizer: HfTokenizer, reference_tokenizer: HfTokenizer
) -> None:
    for add_generation_prompt in (False, True):
        ours = converted_tokenizer.render_chat(CONVERSATION, add_generation_prompt)
        theirs = reference_tokenizer.render_chat(CONVERSATION, add_generation_prompt)
        assert ours == theirs
    assert converted_tokenizer.eos_token == "<|im_end|>"


def test_greedy_tokens_match_transformers_reading_the_gguf(
    converted_dir: Path, converted_tokenizer: HfTokenizer
) -> None:
    prompt = converted_tokenizer.render_chat(CONVERSATION[:1], add_generation_prompt=True)
    prompt_ids = converted_tokenizer.encode(prompt)
    converted = MlxLmModel.load(converted_dir).greedy(prompt_ids, N_NEW_TOKENS)
    reference = HfGgufModel.load(builtin_gguf_path()).greedy(prompt_ids, N_NEW_TOKENS)
    assert converted == reference, converted_tokenizer.decode(converted)
