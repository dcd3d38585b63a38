"""One-time conversion of a llama GGUF into an MLX-quantized Hugging Face directory."""

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from exo.models.gguf_reader import GgufFile, read_gguf
from exo.models.hf_tokenizer import build_tokenizer, tokenizer_config
from exo.models.llama_gguf import (
    LlamaHyperparameters,
    default_quantization,
    hf_tensors,
    module_quantization,
    read_hyperparameters,
)
from exo.models.safetensors_writer import write_safetensors
from exo.shared.types.base import Frozen

ProgressCallback = Callable[[int, int], None]

# Bump when the output layout changes: older conversions are then redone.
CONVERSION_FORMAT = 1
# Written last: a directory without it is an interrupted conversion.
MARKER_NAME = "exo_conversion.json"
WEIGHTS_NAME = "model.safetensors"
_PROGRESS_STEPS = 100
# Room beyond the weights for the tokenizer, the configs and the filesystem's own blocks.
_SPACE_SLACK_BYTES = 16 * 1024 * 1024


class NotEnoughDiskSpace(OSError):
    """The model store's disk cannot hold the converted model: checked before writing."""


class ConversionRecord(Frozen):
    format: int
    source_file: str
    source_bytes: int
    tensor_bytes: int
    # The files present, for a model downloaded a stage at a time (None: all of them).
    files: tuple[str, ...] | None = None


def read_record(model_dir: Path) -> ConversionRecord | None:
    """The marker of a finished, current-format conversion, or None."""
    try:
        record = ConversionRecord.model_validate_json((model_dir / MARKER_NAME).read_bytes())
    except (OSError, ValidationError):
        return None
    return record if record.format == CONVERSION_FORMAT else None


def staging_prefix(out_dir: Path) -> str:
    """Name prefix of the temporary directories a conversion into out_dir writes."""
    return f".{out_dir.name}.partial-"


def convert_gguf(
    gguf_path: Path, out_dir: Path, on_progress: ProgressCallback | None = None
) -> None:
    """Convert gguf_path into out_dir (replacing whatever is there) so mlx_lm.load reads it."""
    gguf = read_gguf(gguf_path)
    hparams = read_hyperparameters(gguf)
    tensors = list(hf_tensors(gguf, hparams))
    total = sum(tensor.nbytes for _, tensor in tensors)
    progress = ThrottledProgress(on_progress, total)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    require_free_space(out_dir, total)
    staging = out_dir.parent / f"{staging_prefix(out_dir)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_json(staging / "config.json", _model_config(gguf, hparams))
        _write_json(staging / "generation_config.json", _generation_config(hparams))
        _write_json(staging / "tokenizer_config.json", tokenizer_config(gguf))
        build_tokenizer(gguf).save(str(staging / "tokenizer.json"))
        write_safetensors(staging / WEIGHTS_NAME, tensors, {"format": "mlx"}, progress.advance)
        record = ConversionRecord(
            format=CONVERSION_FORMAT,
            source_file=gguf_path.name,
            source_bytes=gguf_path.stat().st_size,
            tensor_bytes=total,
        )
        (staging / MARKER_NAME).write_text(record.model_dump_json(indent=2))
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress.finish()


def require_free_space(out_dir: Path, writing: int) -> None:
    """Raise NotEnoughDiskSpace unless out_dir's disk can take `writing` more bytes (and slack)."""
    needed, free = writing + _SPACE_SLACK_BYTES, shutil.disk_usage(out_dir.parent).free
    if free < needed:
        raise NotEnoughDiskSpace(
            f"not enough disk space to prepare {out_dir.name} in {out_dir.parent}: it needs "
            f"{_megabytes(needed)}, {_megabytes(free)} free"
        )


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def _model_config(gguf: GgufFile, hparams: LlamaHyperparameters) -> dict[str, object]:
    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hparams.hidden_size,
        "intermediate_size": hparams.intermediate_size,
        "num_hidden_layers": hparams.n_layers,
        "num_attention_heads": hparams.n_heads,
        "num_key_value_heads": hparams.n_kv_heads,
        "head_dim": hparams.head_dim,
        "rms_norm_eps": hparams.rms_norm_eps,
        "rope_theta": hparams.rope_theta,
        "max_position_embeddings": hparams.context_length,
        "vocab_size": hparams.vocab_size,
        "tie_word_embeddings": hparams.tie_word_embeddings,
        "bos_token_id": hparams.bos_token_id,
        "eos_token_id": hparams.eos_token_id,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float16",
    }
    modules = module_quantization(gguf)
    default = default_quantization(modules)
    if default is not None:
        quantization: dict[str, object] = {**default.model_dump(), "mode": "affine"}
        # mlx_lm reads per-module overrides keyed by module path (the Q8_0 embedding).
        for path, setting in modules.items():
            if setting != default:
                quantization[path] = {**setting.model_dump(), "mode": "affine"}
        config["quantization"] = quantization
        config["quantization_config"] = quantization
    return config


def _generation_config(hparams: LlamaHyperparameters) -> dict[str, object]:
    return {
        "bos_token_id": hparams.bos_token_id,
        "eos_token_id": hparams.eos_token_id,
        "do_sample": False,
    }


def _write_json(path: Path, content: dict[str, object]) -> None:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        # Move the stale directory aside first so out_dir is never half-deleted.
        discarded = staging.with_name(staging.name + "-discarded")
        out_dir.rename(discarded)
        shutil.rmtree(discarded, ignore_errors=True)
    staging.rename(out_dir)


class ThrottledProgress:
    """Reports (done, total) at most _PROGRESS_STEPS + 1 times."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self._total = total
        self._done = 0
        self._reported_step = -1

    def advance(self, n_bytes: int) -> None:
        self._done += n_bytes
        step = self._done * _PROGRESS_STEPS // max(self._total, 1)
        if self._callback is not None and step > self._reported_step and self._done < self._total:
            self._reported_step = step
            self._callback(self._done, self._total)

    def finish(self) -> None:
        if self._callback is not None:
            self._callback(self._total, self._total)
