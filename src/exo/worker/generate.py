"""Chat generation on a single-stage shard, for any engine, plus the pure text helpers.

The decode loop keeps one step in flight: it builds and schedules step n+1 before waiting
for token n, so graph construction overlaps computation (as mlx_lm's generate_step does).
"""

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from exo.shared.types.chat import ChatMessage, ChatParams, FinishReason
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd, TokenChunk
from exo.worker.engines.base import ArrayT, Engine, RequestT

PREFILL_CHUNK_TOKENS = 512
_REPLACEMENT = "\ufffd"


class ChatCodec(Protocol):
    """What generation needs from a tokenizer (`ChatTokenizer` is the real one)."""

    @property
    def eos_ids(self) -> frozenset[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class IncrementalDetokenizer:
    """Turns token ids into text one at a time without emitting broken UTF-8.

    Decodes a short window: the tokens already emitted since the last boundary (whose text
    is known) plus the new ones, and emits only the difference once it does not end in a
    replacement character (a multi-byte character split across tokens).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held at the end of generation (incomplete bytes included)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopStringFilter:
    """Cuts the text at the first stop string, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was reached)."""
        buffer = self._held + text
        hits = [i for s in self._stops if (i := buffer.find(s)) >= 0]
        if hits:
            self._held = ""
            return buffer[: min(hits)], True
        hold = max((_overlap(buffer, s) for s in self._stops), default=0)
        self._held = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of stop."""
    for k in range(min(len(stop) - 1, len(text)), 0, -1):
        if text.endswith(stop[:k]):
            return k
    return 0


def _never() -> bool:
    return False


def generate(
    engine: Engine[ArrayT, RequestT],
    tokenizer: ChatCodec,
    task_id: TaskId,
    params: ChatParams,
    is_cancelled: Callable[[], bool] = _never,
) -> Iterator[TokenChunk | StreamEnd]:
    """One chat completion: a TokenChunk per sampled token (the end-of-sequence token
    included, carrying any held-back text), then a StreamEnd.

    `is_cancelled` is polled between prefill chunks and between tokens. Errors raise.
    """
    started = time.perf_counter()
    if not engine.shard.is_full:
        raise ValueError("generate needs a shard holding every layer")
    sampling = params.sampling
    prompt = tokenizer.encode_chat(params.messages)
    if not prompt:
        raise ValueError("the chat template rendered an empty prompt")
    room = engine.context_length - len(prompt)
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room in a context of {engine.context_length}"
        )
    max_tokens = min(sampling.max_tokens, room)
    request = engine.new_request(len(prompt) + max_tokens, sampling.seed)

    def end(reason: FinishReason, n: int, ttft_s: float, decode_s: float) -> StreamEnd:
        return StreamEnd(
            task_id=task_id,
            finish_reason=reason,
            prompt_tokens=len(prompt),
            completion_tokens=n,
            time_to_first_token_ms=ttft_s * 1000.0,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        )

    # All but the last prompt token fill the cache only; the last one gives the logits.
    # (That is also measurably faster on MLX's CPU kernels than one pass over the prompt.)
    body = prompt[:-1]
    for i in range(0, len(body), PREFILL_CHUNK_TOKENS):
        if is_cancelled():
            yield end("cancelled", 0, 0.0, 0.0)
            return
        engine.forward(engine.token_input(body[i : i + PREFILL_CHUNK_TOKENS]), request)
        engine.schedule_cache(request)
    if is_cancelled():
        yield end("cancelled", 0, 0.0, 0.0)
        return
    logits = engine.forward(engine.token_input(prompt[-1:]), request)
    token = engine.sample(logits, sampling, request)
    engine.schedule(token)

    detokenizer = IncrementalDetokenizer(tokenizer.decode)
    stops = StopStringFilter(sampling.stop)
    first_token_at = started
    n = 0
    while True:
        next_token = None
        if n + 1 < max_tokens:
            next_token = engine.sample(engine.forward(token, request), sampling, request)
            engine.schedule(next_token)
        token_id = engine.read_token(token)
        now = time.perf_counter()
        n += 1
        if n == 1:
            first_token_at = now
        ttft_s, decode_s = first_token_at - started, now - first_token_at
        if token_id in tokenizer.eos_ids:
            text = stops.push(detokenizer.flush())[0] + stops.flush()
            yield TokenChunk(task_id=task_id, text=text, token_id=token_id)
            yield end("stop", n, ttft_s, decode_s)
            return
        text, stopped = stops.push(detokenizer.add(token_id))
        if stopped:
            yield TokenChunk(task_id=task_id, text=text, token_id=token_id)
            yield end("stop", n, ttft_s, decode_s)
            return
        if next_token is None:
            tail, stopped = stops.push(detokenizer.flush())
            text += tail + ("" if stopped else stops.flush())
            yield TokenChunk(task_id=task_id, text=text, token_id=token_id)
            yield end("stop" if stopped else "length", n, ttft_s, decode_s)
            return
        yield TokenChunk(task_id=task_id, text=text, token_id=token_id)
        if is_cancelled():
            yield end("cancelled", n, ttft_s, decode_s)
            return
        token = next_token
