"""The engine interface a runner drives, and the tokenizer every engine shares.

An engine holds one pipeline stage: layers [start, end) of a model. The first stage embeds
token ids; the last applies the final norm and output head and samples. Between stages the
hidden state travels as an engine-neutral numpy array, so an mlx stage can feed a torch one.

Engine methods return the engine's own lazy or asynchronous arrays: `schedule` starts the
computation without waiting and `read_token` waits for one sampled token, which lets the
generation loop build step n+1 while step n computes.
"""

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from exo.shared.types.chat import ChatMessage, SamplingParams
from exo.shared.types.instances import EngineName

ArrayT = TypeVar("ArrayT")
RequestT = TypeVar("RequestT")

# Loading progress in [0, 1].
ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class ShardSpec:
    """Layers [start_layer, end_layer) of a model with n_layers layers."""

    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer < self.end_layer <= self.n_layers:
            raise ValueError(
                f"invalid shard [{self.start_layer}, {self.end_layer}) of {self.n_layers} layers"
            )

    @property
    def is_first(self) -> bool:
        return self.start_layer == 0

    @property
    def is_last(self) -> bool:
        return self.end_layer == self.n_layers

    @property
    def is_full(self) -> bool:
        return self.is_first and self.is_last


class Engine(Protocol[ArrayT, RequestT]):
    """One loaded shard. ArrayT is the engine's array type, RequestT its per-request state
    (KV cache for the shard's layers, and on the last stage the sampling RNG)."""

    @property
    def shard(self) -> ShardSpec: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + completion) one request may hold."""
        ...

    def new_request(self, context_tokens: int, seed: int | None) -> RequestT:
        """A KV cache with room for `context_tokens` and an RNG seeded by `seed` (None: random)."""
        ...

    def token_input(self, token_ids: Sequence[int]) -> ArrayT:
        """Token ids as first-stage input, shape [1, L]."""
        ...

    def forward(self, x: ArrayT, request: RequestT) -> ArrayT:
        """Run the shard's layers, appending to the request's cache.

        x: token ids [1, L] (int) on the first stage, else a hidden state [1, L, hidden].
        Returns a hidden state [1, L, hidden], or on the last stage the next-token logits
        [1, vocab] (for the last position only).
        """
        ...

    def sample(self, logits: ArrayT, sampling: SamplingParams, request: RequestT) -> ArrayT:
        """Next token as a [1, 1] id array (a valid first-stage input); greedy at temperature 0."""
        ...

    def schedule(self, x: ArrayT) -> None:
        """Start computing x in the background; returns at once."""
        ...

    def schedule_cache(self, request: RequestT) -> None:
        """Start computing what forward calls queued into the request's cache (a prefill
        chunk whose output nobody reads); returns at once."""
        ...

    def read_token(self, token: ArrayT) -> int:
        """Wait for a sampled token and return its id."""
        ...

    def to_numpy(self, x: ArrayT) -> npt.NDArray[Any]:
        """A hidden state for the hand-off to the next stage (float16 or float32)."""
        ...

    def from_numpy(self, x: npt.NDArray[Any]) -> ArrayT:
        """A hidden state received from the previous stage, in this engine's compute dtype."""
        ...


@runtime_checkable
class BatchingEngine(Engine[ArrayT, RequestT], Protocol[ArrayT, RequestT]):
    """An engine that can advance several requests by one token in a single pass (the torch
    engine); the runner batches decode steps for these. Each request is prefilled alone with
    `forward` first."""

    def batch_input(self, token_ids: Sequence[int]) -> ArrayT:
        """One token id per request as a decode step's input, shape [B, 1]."""
        ...

    def forward_batch(self, x: ArrayT, requests: Sequence[RequestT]) -> ArrayT:
        """x [B, L] ids, row b for requests[b] -> [B, vocab] logits on the last stage."""
        ...

    def sample_batch(
        self, logits: ArrayT, samplings: Sequence[SamplingParams], requests: Sequence[RequestT]
    ) -> ArrayT:
        """[B, vocab] logits -> [B, 1] ids."""
        ...

    def read_tokens(self, tokens: ArrayT) -> list[int]:
        """[B, 1] ids -> B ints, waiting once."""
        ...

    def release(self, request: RequestT) -> None:
        """Free a finished or cancelled request's cache now."""
        ...


@runtime_checkable
class SharesCores(Protocol):
    """An engine whose steps can use more or fewer of the CPU cores it shares with other
    stages of its instance on one node (the torch engine; a no-op elsewhere)."""

    def use_cores(self, alone: bool) -> None:
        """Before a step: `alone` when the step carries every request this stage holds, so
        that no other stage of the instance can have work while it runs."""
        ...


@runtime_checkable
class WorksWhenIdle(Protocol):
    """An engine that defers part of its preparation until its runner has nothing to serve
    (the torch engine compiles the decode steps of larger batches then)."""

    def idle_work(self) -> bool:
        """Do one piece of that work (it may take seconds); False once none is left."""
        ...


def load_engine(
    engine: EngineName, model_dir: Path, shard: ShardSpec, on_progress: ProgressCallback
) -> Engine[Any, Any]:
    """Load a shard with the named engine (imported lazily: each pulls in a large library)."""
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in model directory {model_dir}")
    match engine:
        case "mlx":
            from exo.worker.engines.mlx.engine import MlxEngine

            return MlxEngine.load(model_dir, shard, on_progress)
        case "torch":
            from exo.worker.engines.torch.engine import TorchEngine

            return TorchEngine.load(model_dir, shard, on_progress)


def warm_up(engine: Engine[ArrayT, RequestT]) -> None:
    """One tiny forward (and sample on the last stage) so the first request pays no setup."""
    request = engine.new_request(4, seed=0)
    if engine.shard.is_first:
        x = engine.token_input([0])
    else:
        x = engine.from_numpy(np.zeros((1, 1, engine.hidden_size), dtype=np.float32))
    out = engine.forward(x, request)
    if engine.shard.is_last:
        greedy = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)
        engine.read_token(engine.sample(out, greedy, request))
    else:
        engine.to_numpy(out)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _eos_ids_from(value: object) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {i for i in value if isinstance(i, int)}  # pyright: ignore[reportUnknownVariableType]
    return set()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return data  # pyright: ignore[reportUnknownVariableType]


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        content = value.get("content")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
        return content if isinstance(content, str) else None
    return None


class ChatTokenizer:
    """tokenizer.json + the chat template and end-of-sequence ids of a model directory."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        eos_ids: frozenset[int],
        bos_token: str = "",
        eos_token: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self._bos_token = bos_token
        self._eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self._template = env.from_string(chat_template)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ChatTokenizer":
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        config = _read_json(model_dir / "tokenizer_config.json")
        template = config.get("chat_template")
        template_file = model_dir / "chat_template.jinja"
        if not isinstance(template, str) and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        if not isinstance(template, str):
            raise ValueError(f"no chat template in {model_dir}")
        bos_token = _token_text(config.get("bos_token")) or ""
        eos_token = _token_text(config.get("eos_token")) or ""
        eos_ids = _eos_ids_from(
            _read_json(model_dir / "generation_config.json").get("eos_token_id")
        )
        eos_ids |= _eos_ids_from(_read_json(model_dir / "config.json").get("eos_token_id"))
        if eos_token and (eos_id := tokenizer.token_to_id(eos_token)) is not None:
            eos_ids.add(eos_id)
        if not eos_ids:
            raise ValueError(f"no end-of-sequence token in {model_dir}")
        return cls(tokenizer, template, frozenset(eos_ids), bos_token, eos_token)

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return self._template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            bos_token=self._bos_token,
            eos_token=self._eos_token,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
        )

    def encode(self, text: str) -> list[int]:
        # The chat template writes every special token itself.
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self.encode(self.render_chat(messages))

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (text completion): with the special tokens the tokenizer itself
        adds to a text (a BOS for the models that want one), as Hugging Face does."""
        return self.tokenizer.encode(text, add_special_tokens=True).ids
