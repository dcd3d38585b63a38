"""The mlx engine on the built-in model: pipeline slicing, parity with mlx_lm, seeded sampling."""

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.worker.engines.base import ChatTokenizer, ShardSpec, load_engine
from exo.worker.engines.mlx.engine import MlxEngine
from exo.worker.generate import generate
from tests.conftest import BUILTIN
from tests.sampling_cases import ADJUSTMENTS, greedy_picks
from tests.tiny_models import FAMILY_CASES, assert_logits_match, save_tiny

pytestmark = pytest.mark.slow

N_LAYERS = 30
SPLIT = 13
MESSAGES = (ChatMessage(role="user", content="Tell me a short story about a brave little robot."),)
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, top_p=1.0)


@pytest.fixture(scope="module")
def model_dir(shared_models: Path) -> Path:
    from exo.models.store import ModelStore

    return ModelStore(shared_models).ensure(BUILTIN)


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> ChatTokenizer:
    return ChatTokenizer.from_dir(model_dir)


def _load(model_dir: Path, start: int, end: int) -> MlxEngine:
    progress: list[float] = []
    engine = load_engine("mlx", model_dir, ShardSpec(start, end, N_LAYERS), progress.append)
    assert isinstance(engine, MlxEngine)
    assert progress[-1] == 1.0
    assert progress == sorted(progress)
    return engine


@pytest.fixture(scope="module")
def full(model_dir: Path) -> MlxEngine:
    return _load(model_dir, 0, N_LAYERS)


def _tokens(engine: MlxEngine, tokenizer: ChatTokenizer, sampling: SamplingParams) -> list[int]:
    params = ChatParams(messages=MESSAGES, sampling=sampling)
    return [
        m.token_id for m in generate(engine, tokenizer, TaskId("t"), params) if m.kind == "token"
    ]


def test_two_stage_split_equals_the_full_model(
    model_dir: Path, full: MlxEngine, tokenizer: ChatTokenizer
) -> None:
    first, last = _load(model_dir, 0, SPLIT), _load(model_dir, SPLIT, N_LAYERS)
    prompt = tokenizer.encode_chat(MESSAGES)
    whole = full.new_request(len(prompt) + 4, seed=0)
    stage1, stage2 = first.new_request(len(prompt) + 4, 0), last.new_request(len(prompt) + 4, 0)
    x = prompt
    for _ in range(4):  # the prefill, then decode steps
        expected = full.forward(full.token_input(x), whole)
        hidden = first.to_numpy(first.forward(first.token_input(x), stage1))
        assert hidden.shape == (1, len(x), full.hidden_size)
        got = last.forward(last.from_numpy(hidden), stage2)
        diff = np.abs(full.to_numpy(got) - full.to_numpy(expected))
        assert float(np.max(diff)) <= 1e-5
        x = [full.read_token(full.sample(expected, GREEDY, whole))]


def test_a_middle_stage_holds_only_its_layers(model_dir: Path) -> None:
    middle = _load(model_dir, 5, 10)
    stage: Any = middle._stage  # pyright: ignore[reportPrivateUsage]
    assert len(stage.layers) == 5
    assert not hasattr(stage, "embed_tokens")
    assert not hasattr(stage, "norm")


def test_greedy_tokens_match_mlx_lm(
    model_dir: Path, full: MlxEngine, tokenizer: ChatTokenizer
) -> None:
    import mlx_lm  # pyright: ignore[reportMissingTypeStubs]
    from mlx_lm.generate import generate_step  # pyright: ignore[reportMissingTypeStubs]

    ours = _tokens(full, tokenizer, GREEDY)
    loaded: Any = mlx_lm.load(str(model_dir))  # pyright: ignore[reportUnknownMemberType]
    prompt = mx.array(tokenizer.encode_chat(MESSAGES))
    steps: Any = generate_step(prompt, loaded[0], max_tokens=GREEDY.max_tokens)
    theirs = [int(token) for token, _ in steps]
    assert len(ours) == GREEDY.max_tokens or ours[-1] in tokenizer.eos_ids
    assert ours == theirs[: len(ours)]


def test_seed_makes_sampling_reproducible(full: MlxEngine, tokenizer: ChatTokenizer) -> None:
    nucleus = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    assert _tokens(full, tokenizer, nucleus) == _tokens(full, tokenizer, nucleus)
    plain = nucleus.model_copy(update={"top_p": 1.0, "temperature": 1.5, "seed": 11})
    runs = [_tokens(full, tokenizer, plain.model_copy(update={"seed": s})) for s in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


@ADJUSTMENTS
def test_penalties_and_logit_bias_steer_greedy_choices(
    full: MlxEngine, adjust: dict[str, Any], expected: list[int]
) -> None:
    assert greedy_picks(full, adjust, len(expected)) == expected


@FAMILY_CASES
def test_family_matches_transformers(
    tmp_path: Path, model_type: str, extra: dict[str, Any]
) -> None:
    """Every family and RoPE scaling the torch engine runs, MLX runs the same (float32)."""
    reference = save_tiny(model_type, tmp_path, **extra)
    engine = MlxEngine.load(tmp_path, ShardSpec(0, 3, 3), lambda _: None)
    assert_logits_match(engine, reference)
