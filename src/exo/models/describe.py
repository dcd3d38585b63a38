"""A model card for a hub repository, from its config and safetensors headers alone.

Placement needs a model's layer count and bytes per layer before any node downloads it, so
the card is read from `config.json`, `tokenizer_config.json` and the few kilobytes at the
start of each safetensors file (their headers list every tensor's dtype, shape and byte
range). `card_from_repo` is the pure part; `describe` fetches what it reads.
"""

import json
import re
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from exo.models.architecture import ModelArgs, layer_of
from exo.models.hub import HubClient, HubError, HubFile, HubSource
from exo.shared.types.ids import ModelId
from exo.shared.types.models import ModelCard

# What a node downloads of a repository: weights, configs, tokenizer, chat template.
_WANTED = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer\.json|tokenizer_config\.json"
    r"|special_tokens_map\.json|chat_template\.jinja|model\.safetensors\.index\.json"
    r"|[^/]+\.safetensors)$"
)
# A header past this is not a model's (the largest models' are a few megabytes).
_MAX_HEADER_BYTES = 64 * 1024 * 1024
_FIRST_READ_BYTES = 64 * 1024
_KV_BYTES = 2  # the KV cache is float16 (as the built-in card's)
_HEADER = TypeAdapter(dict[str, Any])


class TensorInfo(BaseModel):
    """One tensor of a safetensors header."""

    model_config = ConfigDict(frozen=True)
    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]


class UnsupportedModel(ValueError):
    """A repository exo cannot serve, with the reason."""


def wanted_files(files: Sequence[HubFile]) -> list[HubFile]:
    return [f for f in files if _WANTED.match(f.path)]


def card_from_repo(
    source: HubSource,
    config: Mapping[str, Any],
    tokenizer_config: Mapping[str, Any],
    files: Sequence[HubFile],
    headers: Mapping[str, Mapping[str, TensorInfo]],
) -> ModelCard:
    """The card of a repository; `headers` maps each safetensors file to its parsed header."""
    try:
        args = ModelArgs.from_config(dict(config))
    except (KeyError, TypeError, ValueError, NotImplementedError) as e:
        raise UnsupportedModel(f"{source.repo}: {e}") from e
    names = {f.path for f in files}
    if "tokenizer.json" not in names:
        raise UnsupportedModel(f"{source.repo} has no tokenizer.json")
    if not isinstance(tokenizer_config.get("chat_template"), str | list) and (
        "chat_template.jinja" not in names
    ):
        raise UnsupportedModel(f"{source.repo} has no chat template: exo serves chat models")
    if not headers:
        raise UnsupportedModel(f"{source.repo} has no safetensors weights")
    per_layer = [0] * args.num_hidden_layers
    other = 0
    dtypes: Counter[str] = Counter()
    for header in headers.values():
        for name, tensor in header.items():
            size = tensor.nbytes
            dtypes[tensor.dtype.lower()] += size
            layer = layer_of(name)
            if layer is None:
                other += size
            elif layer < args.num_hidden_layers:
                per_layer[layer] += size
            else:
                raise UnsupportedModel(f"{source.repo}: {name} is past the config's layers")
    if not all(per_layer) or "model.embed_tokens.weight" not in _all_names(headers):
        raise UnsupportedModel(
            f"{source.repo}: the weights are not a Llama-family checkpoint's "
            "(model.embed_tokens, model.layers.N.*)"
        )
    return ModelCard(
        model_id=ModelId(source.repo),
        display_name=source.repo.split("/", 1)[1],
        architecture=args.model_type,
        n_layers=args.num_hidden_layers,
        hidden_size=args.hidden_size,
        vocab_size=args.vocab_size,
        context_length=args.max_position_embeddings,
        dtype=_dtype(config, dtypes),
        bytes_per_layer=max(per_layer),
        bytes_non_layer=other,
        kv_bytes_per_token_per_layer=2 * args.num_key_value_heads * args.head_dim * _KV_BYTES,
        kv_dtype="float16",
        source=str(source),
    )


def describe(client: HubClient, repo: str, revision: str = "main") -> ModelCard:
    """Pin `revision` to its commit and read the card (a few small requests, no weights)."""
    source = HubSource(repo, client.commit_of(repo, revision))
    files = wanted_files(client.files(source.repo, source.commit))
    names = {f.path for f in files}
    if "config.json" not in names:
        raise UnsupportedModel(f"{repo} has no config.json: not a transformers model")
    config = _read_json(client, source, "config.json")
    tokenizer_config = (
        _read_json(client, source, "tokenizer_config.json")
        if "tokenizer_config.json" in names
        else {}
    )
    headers = {
        f.path: safetensors_header(client, source, f)
        for f in files
        if f.path.endswith(".safetensors")
    }
    return card_from_repo(source, config, tokenizer_config, files, headers)


def safetensors_header(
    client: HubClient, source: HubSource, file: HubFile
) -> dict[str, TensorInfo]:
    """A safetensors file's tensors: 8 bytes of little-endian length, then that much JSON."""
    start = client.read(source.repo, source.commit, file.path, 0, _FIRST_READ_BYTES)
    if len(start) < 8:
        raise UnsupportedModel(f"{file.path} is too short to be safetensors")
    (length,) = struct.unpack("<Q", start[:8])
    if length > min(_MAX_HEADER_BYTES, file.size - 8):
        raise UnsupportedModel(f"{file.path} has no valid safetensors header")
    raw = start[8 : 8 + length]
    if len(raw) < length:
        raw += client.read(source.repo, source.commit, file.path, 8 + len(raw), length - len(raw))
    try:
        header = _HEADER.validate_json(raw)
    except ValidationError as e:
        raise UnsupportedModel(f"{file.path} has no valid safetensors header: {e}") from e
    header.pop("__metadata__", None)
    tensors: dict[str, TensorInfo] = {}
    for name, info in header.items():
        try:
            tensors[name] = TensorInfo.model_validate(info)
        except ValidationError as e:
            raise UnsupportedModel(f"{file.path}: tensor {name}: {e}") from e
        if not 0 <= tensors[name].data_offsets[0] <= tensors[name].data_offsets[1]:
            raise UnsupportedModel(f"{file.path}: tensor {name} has no valid byte range")
    return tensors


def _read_json(client: HubClient, source: HubSource, path: str) -> dict[str, Any]:
    raw = client.read(source.repo, source.commit, path, 0, _MAX_HEADER_BYTES)
    try:
        content = json.loads(raw)
    except ValueError as e:
        raise HubError(f"{source.repo}/{path} is not JSON") from e
    if not isinstance(content, dict):
        raise UnsupportedModel(f"{source.repo}/{path} is not a JSON object")
    return dict(content)  # pyright: ignore[reportUnknownArgumentType]


def _all_names(headers: Mapping[str, Mapping[str, TensorInfo]]) -> set[str]:
    return {name for header in headers.values() for name in header}


def _dtype(config: Mapping[str, Any], dtypes: Counter[str]) -> str:
    """`q4_affine_g64` for an mlx-community quantized checkpoint, else the main dtype."""
    quantization = config.get("quantization") or config.get("quantization_config")
    if isinstance(quantization, dict) and "bits" in quantization:
        q: dict[str, Any] = dict(quantization)  # pyright: ignore[reportUnknownArgumentType]
        mode = str(q.get("mode", "affine"))
        return f"q{q['bits']}_{mode}_g{q.get('group_size', 64)}"
    names = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
    main = dtypes.most_common(1)[0][0]
    return names.get(main, main)
