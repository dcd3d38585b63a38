"""The tokenizer a GGUF describes, rebuilt as a Hugging Face `tokenizer.json`."""

from functools import cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from exo.models.gguf_reader import GgufFile

# llama.cpp's token types: 3 marks control tokens such as <|im_start|>.
_CONTROL = 3


def build_tokenizer(gguf: GgufFile) -> Tokenizer:
    kind = gguf.text("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF tokenizers convert, not {kind!r}")
    tokens = [_byte_level_spelling(token) for token in gguf.texts("tokenizer.ggml.tokens")]
    merges = [_merge_pair(merge) for merge in gguf.texts("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # SmolLM's own tokenizer splits every digit off before the byte-level regex.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    token_types = gguf.integers("tokenizer.ggml.token_type")
    # The stub types this list's items as unknown; AddedToken is what it takes.
    tokenizer.add_special_tokens(  # pyright: ignore[reportUnknownMemberType]
        [
            AddedToken(token, special=True, normalized=False)
            for token, token_type in zip(tokens, token_types, strict=True)
            if token_type == _CONTROL
        ]
    )
    return tokenizer


def tokenizer_config(gguf: GgufFile) -> dict[str, object]:
    """What `transformers.AutoTokenizer` needs besides tokenizer.json."""
    tokens = gguf.texts("tokenizer.ggml.tokens")
    token_types = gguf.integers("tokenizer.ggml.token_type")
    config: dict[str, object] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[gguf.integer("tokenizer.ggml.bos_token_id")],
        "eos_token": tokens[gguf.integer("tokenizer.ggml.eos_token_id")],
        "add_bos_token": gguf.flag("tokenizer.ggml.add_bos_token", False),
        "add_eos_token": gguf.flag("tokenizer.ggml.add_eos_token", False),
        "clean_up_tokenization_spaces": False,
        "model_max_length": gguf.integer("llama.context_length"),
        "additional_special_tokens": [
            token
            for token, token_type in zip(tokens, token_types, strict=True)
            if token_type == _CONTROL
        ],
    }
    for key, name in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if f"tokenizer.ggml.{name}" in gguf.metadata:
            config[key] = tokens[gguf.integer(f"tokenizer.ggml.{name}")]
    if "tokenizer.chat_template" in gguf.metadata:
        config["chat_template"] = gguf.text("tokenizer.chat_template")
    return config


@cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, as byte-level BPE vocabularies use it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    spelling = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in spelling:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


@cache
def _byte_characters() -> frozenset[str]:
    return frozenset(_byte_alphabet().values())


def _byte_level_spelling(token: str) -> str:
    # A token with characters outside the byte alphabet is stored as raw text: respell it.
    if set(token) <= _byte_characters():
        return token
    alphabet = _byte_alphabet()
    return "".join(alphabet[byte] for byte in token.encode("utf-8"))


def _merge_pair(merge: str) -> tuple[str, str]:
    left, right = merge.split(" ", 1)
    return left, right
