"""The generation loop and its text helpers, with a scripted engine and a byte tokenizer."""

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd, TokenChunk
from exo.worker.engines.base import ShardSpec
from exo.worker.generate import IncrementalDetokenizer, StopStringFilter, generate

EOS = 0


def byte_decode(vocab: dict[int, bytes]) -> Callable[[Sequence[int]], str]:
    """A byte-level tokenizer's decode: invalid UTF-8 becomes U+FFFD, as in `tokenizers`."""

    def decode(ids: Sequence[int]) -> str:
        return b"".join(vocab[i] for i in ids if i != EOS).decode("utf-8", errors="replace")

    return decode


def tokens_for(pieces: Sequence[bytes]) -> tuple[dict[int, bytes], list[int]]:
    vocab = {i + 1: piece for i, piece in enumerate(pieces)}
    return vocab, list(vocab)


def detokenize(pieces: Sequence[bytes]) -> list[str]:
    vocab, ids = tokens_for(pieces)
    detokenizer = IncrementalDetokenizer(byte_decode(vocab))
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


# --- IncrementalDetokenizer -------------------------------------------------------------


def test_two_byte_character_split_across_tokens_is_emitted_whole() -> None:
    chunks = detokenize([b"caf", "é".encode()[:1], "é".encode()[1:], b"!"])
    assert chunks == ["caf", "", "é", "!", ""]


def test_four_byte_emoji_split_into_single_bytes() -> None:
    emoji = "🙂".encode()
    chunks = detokenize([b"a", *(emoji[i : i + 1] for i in range(4)), b"b"])
    assert chunks == ["a", "", "", "", "🙂", "b", ""]


def test_incomplete_bytes_at_the_end_are_flushed_as_replacement() -> None:
    chunks = detokenize([b"x", "é".encode()[:1]])
    assert chunks == ["x", "", "\ufffd"]


@given(st.text(min_size=1, max_size=40), st.data())
def test_any_byte_split_reassembles_without_broken_characters(
    text: str, data: st.DataObject
) -> None:
    raw = text.encode()
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(raw) - 1)), max_size=len(raw))))
    bounds = [0, *[c for c in cuts if c < len(raw)], len(raw)]
    pieces = [raw[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    chunks = detokenize(pieces)
    assert "".join(chunks) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in chunk for chunk in chunks)


# --- StopStringFilter -------------------------------------------------------------------


def test_stop_string_split_across_pushes_is_held_then_cut() -> None:
    stops = StopStringFilter(["</end>"])
    assert stops.push("Hello </") == ("Hello ", False)
    assert stops.push("en") == ("", False)
    assert stops.push("d> tail") == ("", True)


def test_held_prefix_is_released_when_it_turns_out_not_to_stop() -> None:
    stops = StopStringFilter(["STOP"])
    assert stops.push("a ST") == ("a ", False)
    assert stops.push("ART") == ("START", False)
    assert stops.push("x S") == ("x ", False)
    assert stops.flush() == "S"


def test_earliest_of_several_stop_strings_wins() -> None:
    stops = StopStringFilter(["bb", "a"])
    assert stops.push("xxbba") == ("xx", True)


def test_no_stop_strings_passes_everything_through() -> None:
    stops = StopStringFilter([])
    assert stops.push("abc") == ("abc", False)
    assert stops.flush() == ""


# --- generate() with a scripted engine -------------------------------------------------


@dataclass
class ScriptedRequest:
    context_tokens: int
    step: int = 0
    cached: int = 0


class ScriptedEngine:
    """Samples a fixed sequence of tokens; arrays are plain lists of ids."""

    def __init__(self, script: Sequence[int], context_length: int = 64) -> None:
        self.script = list(script)
        self._context_length = context_length
        self.requests: list[ScriptedRequest] = []

    @property
    def shard(self) -> ShardSpec:
        return ShardSpec(0, 2, 2)

    @property
    def hidden_size(self) -> int:
        return 4

    @property
    def context_length(self) -> int:
        return self._context_length

    def new_request(self, context_tokens: int, seed: int | None) -> ScriptedRequest:
        self.requests.append(ScriptedRequest(context_tokens))
        return self.requests[-1]

    def token_input(self, token_ids: Sequence[int]) -> list[int]:
        return list(token_ids)

    def forward(self, x: list[int], request: ScriptedRequest) -> list[int]:
        request.cached += len(x)
        assert request.cached <= request.context_tokens
        return x

    def sample(
        self, logits: list[int], sampling: SamplingParams, request: ScriptedRequest
    ) -> list[int]:
        # The loop builds one step ahead, so it may sample once past the end.
        request.step += 1
        return [self.script[request.step - 1] if request.step <= len(self.script) else EOS]

    def schedule(self, x: list[int]) -> None:
        pass

    def schedule_cache(self, request: ScriptedRequest) -> None:
        pass

    def read_token(self, token: list[int]) -> int:
        return token[0]

    def to_numpy(self, x: list[int]) -> npt.NDArray[Any]:
        return np.asarray(x, dtype=np.float32)

    def from_numpy(self, x: npt.NDArray[Any]) -> list[int]:
        return [int(v) for v in x.ravel()]


class ByteCodec:
    def __init__(self, vocab: dict[int, bytes], prompt_tokens: int = 5) -> None:
        self._decode = byte_decode(vocab)
        self._prompt_tokens = prompt_tokens

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset({EOS})

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        return [1] * self._prompt_tokens

    def encode_prompt(self, text: str) -> list[int]:
        return [2] * self._prompt_tokens

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._decode(token_ids)


def run(
    pieces: Sequence[bytes],
    *,
    eos: bool = True,
    max_tokens: int = 32,
    stop: tuple[str, ...] = (),
    prompt_tokens: int = 5,
    context_length: int = 64,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> tuple[list[TokenChunk], StreamEnd]:
    vocab, ids = tokens_for(pieces)
    engine = ScriptedEngine([*ids, EOS] if eos else ids, context_length)
    params = ChatParams(
        messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, stop=stop),
    )
    messages = list(
        generate(engine, ByteCodec(vocab, prompt_tokens), TaskId("t"), params, is_cancelled)
    )
    *chunks, end = messages
    assert isinstance(end, StreamEnd)
    assert all(isinstance(c, TokenChunk) for c in chunks)
    return [c for c in chunks if isinstance(c, TokenChunk)], end


def test_eos_ends_with_stop_and_counts_every_sampled_token() -> None:
    chunks, end = run([b"Hel", b"lo"])
    assert [c.text for c in chunks] == ["Hel", "lo", ""]
    assert [c.token_id for c in chunks] == [1, 2, EOS]
    assert (end.finish_reason, end.prompt_tokens, end.completion_tokens) == ("stop", 5, 3)


def test_max_tokens_ends_with_length_and_flushes_held_text() -> None:
    chunks, end = run([b"a", b" #", b"b"], eos=False, max_tokens=2, stop=("##",))
    assert "".join(c.text for c in chunks) == "a #"
    assert (end.finish_reason, end.completion_tokens) == ("length", 2)


def test_stop_string_across_tokens_truncates_and_stops() -> None:
    chunks, end = run([b"Hello ", b"#", b"#END", b" more"], stop=("##END",))
    assert "".join(c.text for c in chunks) == "Hello "
    assert end.finish_reason == "stop"
    assert end.completion_tokens == 3


def test_multibyte_character_split_by_tokens_never_streams_broken_text() -> None:
    raw = "né🙂".encode()
    chunks, _ = run([raw[i : i + 1] for i in range(len(raw))])
    assert "".join(c.text for c in chunks) == "né🙂"
    assert all("\ufffd" not in c.text for c in chunks)


def test_cancel_is_seen_between_tokens() -> None:
    vocab, ids = tokens_for([b"a", b"b", b"c", b"d"])
    received: list[TokenChunk] = []
    params = ChatParams(
        messages=(ChatMessage(role="user", content="hi"),),
        sampling=SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0),
    )
    stream = generate(
        ScriptedEngine(ids), ByteCodec(vocab), TaskId("t"), params, lambda: len(received) >= 2
    )
    for message in stream:
        if isinstance(message, TokenChunk):
            received.append(message)
        else:
            assert (message.finish_reason, message.completion_tokens) == ("cancelled", 2)
    assert [c.text for c in received] == ["a", "b"]


def test_cancel_before_prefill_yields_no_tokens() -> None:
    chunks, end = run([b"a"], is_cancelled=lambda: True)
    assert chunks == []
    assert (end.finish_reason, end.completion_tokens) == ("cancelled", 0)


def test_completion_is_clamped_to_the_context_left() -> None:
    chunks, end = run([b"x"] * 10, eos=False, prompt_tokens=60, context_length=64)
    assert len(chunks) == 4
    assert end.finish_reason == "length"


def test_prompt_filling_the_context_is_an_error() -> None:
    with pytest.raises(ValueError, match="no room"):
        run([b"x"], prompt_tokens=64, context_length=64)
