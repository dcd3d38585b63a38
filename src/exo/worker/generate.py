"""Chat generation on a single-stage shard, for any engine, plus the pure text helpers.

The decode loop keeps one step in flight: it builds and schedules step n+1 before waiting
for token n, so graph construction overlaps computation (as mlx_lm's generate_step does).
"""

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from loguru import logger

from exo.shared.types.chat import ChatMessage, ChatParams, FinishReason
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.worker.engines.base import ArrayT, Engine, RequestT

PREFILL_CHUNK_TOKENS = 512
_REPLACEMENT = "\ufffd"


class ChatCodec(Protocol):
    """What generation needs from a tokenizer (`ChatTokenizer` is the real one)."""

    @property
    def eos_ids(self) -> frozenset[int]: ...

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

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


class TokenStream:
    """One request's text handling, shared by `generate` and the runner's batched loop:
    detokenizing, stop strings, end-of-sequence and max_tokens, and the counters its
    StreamEnd reports. Feed it each sampled token id with `push`; it is `finished` once it
    has returned a StreamEnd."""

    def __init__(
        self,
        task_id: TaskId,
        tokenizer: ChatCodec,
        prompt_tokens: int,
        max_tokens: int,
        stop: Sequence[str],
        started: float,
    ) -> None:
        self.task_id = task_id
        self.max_tokens = max_tokens
        self._eos_ids = tokenizer.eos_ids
        self._prompt_tokens = prompt_tokens
        self._detokenizer = IncrementalDetokenizer(tokenizer.decode)
        self._stops = StopStringFilter(stop)
        self._started = started
        self._first_token_at = started
        self._ttft_s = 0.0
        self._decode_s = 0.0
        self.n = 0
        self.finished = False

    @property
    def wants_more(self) -> bool:
        """Whether a token after the next one may still be needed (max_tokens allows it)."""
        return self.n + 1 < self.max_tokens

    def end(self, reason: FinishReason) -> StreamEnd:
        self.finished = True
        n = self.n
        return StreamEnd(
            task_id=self.task_id,
            finish_reason=reason,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=n,
            time_to_first_token_ms=self._ttft_s * 1000.0,
            decode_tokens_per_s=(n - 1) / self._decode_s if n > 1 and self._decode_s > 0 else 0.0,
        )

    def push(self, token_id: int) -> list[TokenChunk | StreamEnd]:
        """The TokenChunk for a sampled token, followed by a StreamEnd if it ends the stream
        (end-of-sequence, a stop string, or max_tokens reached)."""
        now = time.perf_counter()
        self.n += 1
        if self.n == 1:
            self._first_token_at = now
        self._ttft_s, self._decode_s = (
            self._first_token_at - self._started,
            now - self._first_token_at,
        )
        stops = self._stops
        if token_id in self._eos_ids:
            text = stops.push(self._detokenizer.flush())[0] + stops.flush()
            return [self._chunk(text, token_id), self.end("stop")]
        text, stopped = stops.push(self._detokenizer.add(token_id))
        if stopped:
            return [self._chunk(text, token_id), self.end("stop")]
        if self.n >= self.max_tokens:
            tail, stopped = stops.push(self._detokenizer.flush())
            text += tail + ("" if stopped else stops.flush())
            return [self._chunk(text, token_id), self.end("stop" if stopped else "length")]
        return [self._chunk(text, token_id)]

    def _chunk(self, text: str, token_id: int) -> TokenChunk:
        return TokenChunk(task_id=self.task_id, text=text, token_id=token_id)


def prepare_prompt(
    engine: Engine[ArrayT, RequestT], tokenizer: ChatCodec, params: ChatParams
) -> tuple[list[int], int]:
    """The prompt's token ids and the most tokens the request may generate. Errors raise."""
    if not engine.shard.is_full:
        raise ValueError("generate needs a shard holding every layer")
    return prompt_budget(tokenizer, params, engine.context_length)


class PromptTooLong(ValueError):
    """The chat's prompt fills the model's context: the client's to shorten."""

    def __init__(self, prompt_tokens: int, context_length: int) -> None:
        super().__init__(
            f"The messages come to {prompt_tokens} tokens, which leaves no room to generate "
            f"in this model's context of {context_length} tokens. Shorten the messages."
        )


def failed(task_id: TaskId, exc: Exception, *, log: bool = True) -> StreamError:
    """The stream's end for a request that could not start or go on because of `exc`; logged
    unless the caller did (the request's own fault in a line, anything else with its trace)."""
    if isinstance(exc, PromptTooLong):
        if log:
            logger.warning(f"rejected {task_id}: {exc}")
        return StreamError(task_id=task_id, message=str(exc), code="context_length_exceeded")
    if log:
        logger.opt(exception=exc).error(f"generation for {task_id} failed")
    return StreamError(task_id=task_id, message=f"{type(exc).__name__}: {exc}")


def prompt_budget(
    tokenizer: ChatCodec, params: ChatParams, context_length: int
) -> tuple[list[int], int]:
    """The prompt's token ids and the most tokens it leaves room for (any pipeline stage)."""
    if params.prompt is not None:
        prompt = tokenizer.encode_prompt(params.prompt)
    else:
        prompt = tokenizer.encode_chat(params.messages)
    if not prompt:
        raise ValueError("the prompt is empty once tokenized")
    room = context_length - len(prompt)
    if room < 1:
        raise PromptTooLong(len(prompt), context_length)
    return prompt, min(params.sampling.max_tokens, room)


def prefill(
    engine: Engine[ArrayT, RequestT],
    request: RequestT,
    prompt: Sequence[int],
    is_cancelled: Callable[[], bool] = _never,
) -> ArrayT | None:
    """Fill the request's cache with the prompt; the last position's logits, or None if
    `is_cancelled` (polled between chunks) said stop."""
    # All but the last prompt token fill the cache only; the last one gives the logits.
    # (That is also measurably faster on MLX's CPU kernels than one pass over the prompt.)
    body = prompt[:-1]
    for i in range(0, len(body), PREFILL_CHUNK_TOKENS):
        if is_cancelled():
            return None
        engine.forward(engine.token_input(body[i : i + PREFILL_CHUNK_TOKENS]), request)
        engine.schedule_cache(request)
    if is_cancelled():
        return None
    return engine.forward(engine.token_input(prompt[-1:]), request)


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
    sampling = params.sampling
    prompt, max_tokens = prepare_prompt(engine, tokenizer, params)
    request = engine.new_request(len(prompt) + max_tokens, sampling.seed)
    stream = TokenStream(task_id, tokenizer, len(prompt), max_tokens, sampling.stop, started)
    logits = prefill(engine, request, prompt, is_cancelled)
    if logits is None:
        yield stream.end("cancelled")
        return
    token = engine.sample(logits, sampling, request)
    engine.schedule(token)
    while True:
        next_token = None
        if stream.wants_more:
            next_token = engine.sample(engine.forward(token, request), sampling, request)
            engine.schedule(next_token)
        yield from stream.push(engine.read_token(token))
        if stream.finished:
            return
        if is_cancelled():
            yield stream.end("cancelled")
            return
        assert next_token is not None
        token = next_token
