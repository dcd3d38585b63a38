"""Pipeline stages as real runner processes on loopback (separate EXO_HOMEs), linked by
the activation stream: greedy output equals a single stage's, requests share the
pipeline, and faults fail what they should and nothing more."""

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from exo.shared.types.ids import TaskId
from exo.shared.types.instances import EngineName
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.worker.pipeline.frames import (
    BeginRequest,
    FrameFlag,
    FrameKind,
    encode_array,
    encode_begin,
)
from exo.worker.runner.protocol import Cancel, StageJoined, StageLeft
from exo.worker.supervisor import cpu_sharing_env
from tests.conftest import BUILTIN
from tests.daemon import EAGER
from tests.factories import chat_params
from tests.pipeline_chain import OWNER, Chain

pytestmark = pytest.mark.slow

PROMPT = "Name three colours."
TOKENS = 32
Stages = list[tuple[EngineName, int, int]]
# The mixed chain's torch stage computes in float32 with exactly dequantized weights: the
# int4 kernel's bf16 scales would leave MLX's greedy path at a near tie (docs/pipeline.md).
MIXED_ENV = {"EXO_TORCH_WEIGHTS": "float32"}
# The 3-stage torch chain steps eagerly (`EAGER`): the 2-stage chain and the core-sharing
# one check compiled stages against the single stage already, and a pipeline stage compiles
# all its graphs at load (~15-20 s a stage here).


@pytest.fixture(scope="module")
def model_dir(shared_models: Path) -> Path:
    from exo.models.store import ModelStore

    return ModelStore(shared_models).ensure(BUILTIN)


def greedy(
    model_dir: Path, stages: Stages, log_dir: Path, env: dict[str, str] | None = None
) -> tuple[list[int], StreamEnd | StreamError]:
    chain = Chain(model_dir, stages, log_dir, env=env)
    try:
        chain.generate("t", PROMPT, TOKENS)
        return chain.collect(["t"])["t"]
    finally:
        chain.close()


@pytest.fixture(scope="module")
def reference(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[EngineName, list[int]]:
    """Single-stage greedy tokens per engine, computed on first use."""

    class Lazy(dict[EngineName, list[int]]):
        def __missing__(self, engine: EngineName) -> list[int]:
            log = tmp_path_factory.mktemp(f"single-{engine}")
            tokens, end = greedy(model_dir, [(engine, 0, 30)], log)
            assert isinstance(end, StreamEnd), end
            self[engine] = tokens
            return tokens

    return Lazy()


@pytest.mark.parametrize(
    ("engine", "stages", "env"),
    [
        ("mlx", [("mlx", 0, 15), ("mlx", 15, 30)], None),
        ("mlx", [("mlx", 0, 7), ("mlx", 7, 19), ("mlx", 19, 30)], None),
        ("torch", [("torch", 0, 15), ("torch", 15, 30)], None),
        ("torch", [("torch", 0, 10), ("torch", 10, 20), ("torch", 20, 30)], EAGER),
        ("mlx", [("mlx", 0, 10), ("torch", 10, 20), ("mlx", 20, 30)], MIXED_ENV),
    ],
    ids=["mlx-2", "mlx-3", "torch-2", "torch-3", "mlx-torch-mlx"],
)
def test_chain_greedy_equals_single_stage(
    model_dir: Path,
    reference: dict[EngineName, list[int]],
    tmp_path: Path,
    engine: EngineName,
    stages: Stages,
    env: dict[str, str] | None,
) -> None:
    tokens, end = greedy(model_dir, stages, tmp_path, env)
    assert isinstance(end, StreamEnd), end
    assert end.completion_tokens == TOKENS
    assert tokens == reference[engine]


def mlx_chain(model_dir: Path, log_dir: Path, step_timeout_s: float) -> Iterator[Chain]:
    chain = Chain(
        model_dir, [("mlx", 0, 15), ("mlx", 15, 30)], log_dir, step_timeout_s=step_timeout_s
    )
    try:
        yield chain
    finally:
        chain.close()
        for stage in chain.stages:
            stage.kill()


@pytest.fixture
def mlx2(model_dir: Path, tmp_path: Path) -> Iterator[Chain]:
    yield from mlx_chain(model_dir, tmp_path, 60.0)


@pytest.fixture
def mlx2_impatient(model_dir: Path, tmp_path: Path) -> Iterator[Chain]:
    yield from mlx_chain(model_dir, tmp_path, 3.0)


def test_concurrent_requests_share_the_pipeline(
    mlx2: Chain, reference: dict[EngineName, list[int]]
) -> None:
    tasks = [f"c{i}" for i in range(4)]
    for i, task in enumerate(tasks):
        mlx2.generate(task, PROMPT if i == 0 else f"Count to {i + 3}.", TOKENS if i == 0 else 12)
    # A prompt longer than the model's context fails alone, as the client's fault.
    mlx2.generate("too-long", "hello " * 9000, 4)
    results = mlx2.collect([*tasks, "too-long"])
    too_long = results.pop("too-long")[1]
    assert isinstance(too_long, StreamError) and too_long.code == "context_length_exceeded"
    assert all(isinstance(end, StreamEnd) for _, end in results.values()), results
    # Its own KV cache per request: the reference prompt's tokens are unchanged.
    assert results["c0"][0] == reference["mlx"]


def test_torch_stages_sharing_cores_keep_their_tokens(
    model_dir: Path, reference: dict[EngineName, list[int]], tmp_path: Path
) -> None:
    """Two torch stages with the environment the worker gives stages sharing a node's cores:
    one stream steps on all of them, several on each stage's share, switching as requests
    come and go; the tokens stay the single stage's."""
    sharing = cpu_sharing_env(0, 2, engine="torch")
    chain = Chain(model_dir, [("torch", 0, 15), ("torch", 15, 30)], tmp_path, env=sharing)
    try:
        chain.generate("alone", PROMPT, TOKENS)
        alone = chain.collect(["alone"])["alone"]
        tasks = [f"c{i}" for i in range(4)]
        for i, task in enumerate(tasks):
            chain.generate(
                task, PROMPT if i == 0 else f"Count to {i + 3}.", TOKENS if i == 0 else 12
            )
        results = chain.collect(tasks)
    finally:
        chain.close()
    assert alone[0] == reference["torch"], alone
    assert all(isinstance(end, StreamEnd) for _, end in results.values()), results
    assert results["c0"][0] == reference["torch"]


def test_malformed_frames_fail_only_their_request(
    mlx2: Chain, reference: dict[EngineName, list[int]]
) -> None:
    injector = socket.create_connection(("127.0.0.1", mlx2.ports[1]))
    try:
        # An activation for a request the stage never saw.
        ghost = np.zeros((1, 1, 576), dtype=np.float32)
        injector.sendall(encode_array(FrameKind.ACTIVATION, "ghost", 0, FrameFlag.SAMPLE, ghost))
        # A request whose activation has the wrong width.
        begin = BeginRequest(
            task_id=TaskId("bad"),
            owner=OWNER,
            params=chat_params(),
            prompt_tokens=1,
            max_tokens=4,
            context_tokens=5,
        )
        narrow = np.zeros((1, 1, 100), dtype=np.float16)
        injector.sendall(encode_begin(begin))
        injector.sendall(encode_array(FrameKind.ACTIVATION, "bad", 0, FrameFlag.SAMPLE, narrow))
        # A real request in flight gets a frame of the wrong dtype at a wrong step.
        mlx2.generate("victim", "Write a long story about a lighthouse.", 200)
        mlx2.generate("bystander", PROMPT, TOKENS)
        time.sleep(1.0)
        wrong = np.zeros((1, 1, 576), dtype=np.int32)
        injector.sendall(
            encode_array(FrameKind.ACTIVATION, "victim", 10_000, FrameFlag.NONE, wrong)
        )
        results = mlx2.collect(["ghost", "bad", "victim", "bystander"])
    finally:
        injector.close()
    for task in ("ghost", "bad", "victim"):
        end = results[task][1]
        assert isinstance(end, StreamError), (task, end)
        assert "malformed activation frame" in end.message
    assert isinstance(results["bad"][1], StreamError)
    assert "hidden size" in results["bad"][1].message
    tokens, end = results["bystander"]
    assert isinstance(end, StreamEnd) and tokens == reference["mlx"]


def test_time_to_first_token_counts_from_the_first_stage(mlx2: Chain) -> None:
    # Nodes share no clock: BEGIN carries the request's time so far (the first stage's
    # queue and tokenization), and the last stage counts from its arrival minus that.
    sent = time.monotonic()
    mlx2.generate("timed", PROMPT, 4)
    joined: StageJoined | None = None
    client_ttft_ms: float | None = None
    end: StreamEnd | StreamError | None = None
    while end is None:
        message = mlx2.last.recv()
        assert message is not None, mlx2.log_text()
        if isinstance(message, StageJoined):
            joined = message
        elif isinstance(message, TokenChunk) and client_ttft_ms is None:
            client_ttft_ms = (time.monotonic() - sent) * 1000
        elif isinstance(message, StreamEnd | StreamError):
            end = message
    assert isinstance(end, StreamEnd), end
    assert joined is not None and client_ttft_ms is not None
    assert joined.elapsed_ms > 0.0  # the prompt was tokenized before BEGIN left
    assert joined.elapsed_ms <= end.time_to_first_token_ms <= client_ttft_ms


def test_cancel_releases_the_request_on_every_stage(mlx2: Chain) -> None:
    mlx2.generate("long", "Write a long story about a lighthouse.", 400)
    time.sleep(2.0)
    # What the first stage's worker does once the task leaves the state; the other stages
    # learn of it in-band (END).
    mlx2.first.send(Cancel(task_id=TaskId("long")))
    left: set[int] = set()
    deadline = time.monotonic() + 30
    while left != {0, 1} and time.monotonic() < deadline:
        for i, stage in enumerate(mlx2.stages):
            try:
                message = stage.received.get(timeout=0.1)
            except Exception:
                continue
            if isinstance(message, StageLeft) and message.task_id == "long":
                left.add(i)
    assert left == {0, 1}
    mlx2.generate("after", PROMPT, 4)
    assert isinstance(mlx2.collect(["after"])["after"][1], StreamEnd)


@pytest.mark.parametrize("victim", [0, 1])
def test_a_killed_stage_fails_the_request_promptly(mlx2: Chain, victim: int) -> None:
    mlx2.generate("doomed", "Write a long story about a lighthouse.", 400)
    survivor = mlx2.stages[1 - victim]
    # Kill it mid-decode: once the last stage has streamed a token (a fixed sleep raced
    # a slow prefill on a loaded machine).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        message = mlx2.stages[-1].recv(timeout_s=120)
        if isinstance(message, TokenChunk) and message.task_id == "doomed":
            break
    os.kill(mlx2.stages[victim].proc.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        message = survivor.recv(timeout_s=10)
        assert message is not None, "the survivor exited without failing the request"
        if isinstance(message, StreamError) and message.task_id == "doomed":
            break
    assert time.monotonic() - killed_at < 5.0
    assert "pipeline failed" in message.message
    # The survivor reports itself failed and exits: the instance is re-placed.
    assert survivor.proc.wait(timeout=10) == 1


def test_a_stuck_stage_times_the_step_out(mlx2_impatient: Chain) -> None:
    mlx2 = mlx2_impatient
    mlx2.generate("stuck", "Write a long story about a lighthouse.", 400)
    time.sleep(2.0)
    last = mlx2.stages[1].proc.pid
    os.kill(last, signal.SIGSTOP)
    try:
        started = time.monotonic()
        ((_, end),) = mlx2.collect(["stuck"], timeout_s=30).values()
        assert isinstance(end, StreamError) and "within 3s" in end.message
        assert time.monotonic() - started < 10
    finally:
        os.kill(last, signal.SIGCONT)
    # The stage catches up, drops what belonged to the failed request, and serves again.
    mlx2.generate("next", PROMPT, 4)
    assert isinstance(mlx2.collect(["next"])["next"][1], StreamEnd)
