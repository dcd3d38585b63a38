"""Logit adjustments every engine applies alike (tests/test_mlx_engine.py and
tests/test_torch_engine.py run these on their engines), and greedy decoding of a prompt."""

from typing import Any

import numpy as np
import pytest

from exo.shared.types.chat import SamplingParams
from exo.worker.engines.base import Engine

# Greedy picks over logits [5, 4.5, 0, ...], four steps.
ADJUSTMENTS = pytest.mark.parametrize(
    ("adjust", "expected"),
    [
        ({}, [0, 0, 0, 0]),
        ({"frequency_penalty": 1.0}, [0, 1, 0, 1]),  # 5-n vs 4.5-m for n, m picks so far
        ({"presence_penalty": 1.0}, [0, 1, 0, 0]),  # once each seen: 4 vs 3.5 from then on
        ({"logit_bias": ((2, 10.0),)}, [2, 2, 2, 2]),
        ({"logit_bias": ((0, -100.0),)}, [1, 1, 1, 1]),
    ],
    ids=["none", "frequency", "presence", "bias-up", "bias-down"],
)


def greedy_picks(engine: Engine[Any, Any], adjust: dict[str, Any], steps: int) -> list[int]:
    """The tokens one request picks greedily, step after step, from the same logits."""
    sampling = SamplingParams(max_tokens=steps, temperature=0.0, top_p=1.0, **adjust)
    request = engine.new_request(8, seed=0)
    logits = engine.from_numpy(np.array([[5.0, 4.5, 0.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    return [engine.read_token(engine.sample(logits, sampling, request)) for _ in range(steps)]


def greedy_with_logits(
    engine: Engine[Any, Any], prompt: list[int], n: int
) -> tuple[list[int], list[Any]]:
    """n tokens picked greedily after `prompt`, one request, and the logits of each pick."""
    greedy = SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0)
    request = engine.new_request(len(prompt) + n, seed=0)
    logits = engine.forward(engine.token_input(prompt), request)
    tokens: list[int] = []
    every: list[Any] = []
    for _ in range(n):
        every.append(logits[0])
        tokens.append(engine.read_token(engine.sample(logits, greedy, request)))
        logits = engine.forward(engine.token_input(tokens[-1:]), request)
    return tokens, every
