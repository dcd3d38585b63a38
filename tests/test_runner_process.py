"""The runner as a real subprocess, driven through its frame protocol."""

import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

import pytest

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.worker.engines.torch.compile_env import SAVED_GRAPHS_ENV
from exo.worker.runner.protocol import (
    FROM_RUNNER,
    Cancel,
    FromRunner,
    Generate,
    GenerationStarted,
    LoadShard,
    Shutdown,
    StatusReport,
    ToRunner,
    encode_frame,
    read_frame_sync,
)
from tests.conftest import BUILTIN

pytestmark = pytest.mark.slow

TIMEOUT_S = 120.0


class RunnerProcess:
    def __init__(self, stderr: IO[bytes], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exo.worker.runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env={**os.environ, **(env or {})},
        )
        self._received: queue.Queue[FromRunner | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while (payload := read_frame_sync(cast(BinaryIO, self.proc.stdout))) is not None:
            self._received.put(FROM_RUNNER.validate_json(payload))
        self._received.put(None)

    def send(self, message: ToRunner) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(message.model_dump_json().encode()))
        self.proc.stdin.flush()

    def recv(self) -> FromRunner | None:
        """The next message, or None once the runner closed its output."""
        return self._received.get(timeout=TIMEOUT_S)

    def statuses_until(self, *kinds: str) -> list[str]:
        seen: list[str] = []
        while True:
            message = self.recv()
            assert isinstance(message, StatusReport), message
            seen.append(message.status.kind)
            if message.status.kind in kinds:
                return seen

    def until_end(self, task_id: TaskId) -> tuple[list[TokenChunk], StreamEnd | StreamError]:
        chunks: list[TokenChunk] = []
        while True:
            message = self.recv()
            assert message is not None, "runner exited mid-stream"
            if isinstance(message, TokenChunk) and message.task_id == task_id:
                chunks.append(message)
            elif isinstance(message, StreamEnd | StreamError) and message.task_id == task_id:
                return chunks, message

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT_S)


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[RunnerProcess]:
    with (tmp_path / "runner.stderr").open("wb") as stderr:
        process = RunnerProcess(stderr)
        try:
            yield process
        finally:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


@pytest.fixture(scope="module")
def model_dir(shared_models: Path) -> Path:
    from exo.models.store import ModelStore

    return ModelStore(shared_models).ensure(BUILTIN)


def load(runner: RunnerProcess, model_dir: Path) -> None:
    runner.send(
        LoadShard(model_dir=str(model_dir), engine="mlx", start_layer=0, end_layer=30, n_layers=30)
    )
    seen = runner.statuses_until("ready", "failed")
    assert seen[0] == "loading"
    assert seen[-2:] == ["warming_up", "ready"], seen


def request(task: str, content: str = "Say hello.", max_tokens: int = 4) -> Generate:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    params = ChatParams(messages=(ChatMessage(role="user", content=content),), sampling=sampling)
    return Generate(task_id=TaskId(task), params=params)


def test_load_generate_stream_and_shutdown(runner: RunnerProcess, model_dir: Path) -> None:
    load(runner, model_dir)
    runner.send(request("a"))
    assert runner.statuses_until("running") == ["running"]
    assert runner.recv() == GenerationStarted(task_id=TaskId("a"))
    chunks, end = runner.until_end(TaskId("a"))
    assert isinstance(end, StreamEnd)
    assert 1 <= len(chunks) == end.completion_tokens <= 4
    assert end.finish_reason in ("length", "stop")
    assert end.prompt_tokens > 0
    assert "".join(c.text for c in chunks)
    assert runner.statuses_until("ready") == ["ready"]

    # A failing request is reported on its own stream; the runner keeps serving.
    runner.send(request("too-long", content="hello " * 9000))
    runner.send(request("b", max_tokens=2))
    _, failed = runner.until_end(TaskId("too-long"))
    assert isinstance(failed, StreamError)
    assert "no room" in failed.message
    assert failed.code == "context_length_exceeded"  # the client's fault: the API says 400
    chunks, end = runner.until_end(TaskId("b"))
    assert isinstance(end, StreamEnd)
    assert len(chunks) == end.completion_tokens

    runner.send(Shutdown())
    assert runner.wait() == 0


def test_cancel_stops_the_running_task_and_drops_a_queued_one(
    runner: RunnerProcess, model_dir: Path
) -> None:
    load(runner, model_dir)
    runner.send(request("long", content="Write a long essay about the sea.", max_tokens=500))
    runner.send(request("queued"))
    while not isinstance(message := runner.recv(), TokenChunk):
        assert message is not None
    runner.send(Cancel(task_id=TaskId("queued")))
    runner.send(Cancel(task_id=TaskId("long")))
    ends: dict[str, StreamEnd | StreamError] = {}
    while len(ends) < 2:
        message = runner.recv()
        assert message is not None
        if isinstance(message, StreamEnd | StreamError):
            ends[message.task_id] = message
    long_end, queued_end = ends["long"], ends["queued"]
    assert isinstance(long_end, StreamEnd) and long_end.finish_reason == "cancelled"
    assert 1 <= long_end.completion_tokens < 100
    assert isinstance(queued_end, StreamEnd) and queued_end.finish_reason == "cancelled"
    assert queued_end.completion_tokens == 0

    runner.send(request("after", max_tokens=1))
    chunks, end = runner.until_end(TaskId("after"))
    assert isinstance(end, StreamEnd) and len(chunks) == 1

    assert runner.proc.stdin is not None
    runner.proc.stdin.close()  # end of input is a clean shutdown too
    assert runner.wait() == 0


def failed_load_reason(runner: RunnerProcess, load: LoadShard) -> str:
    """Send `load`, which must fail: the statuses up to the runner's exit end in Failed, the
    runner exits non-zero; the failure's reason."""
    runner.send(load)
    seen: list[StatusReport] = []
    while (message := runner.recv()) is not None:
        assert isinstance(message, StatusReport)
        seen.append(message)
    assert seen[-1].status.kind == "failed"
    assert runner.wait() != 0
    return getattr(seen[-1].status, "reason", "")


def test_bad_model_dir_reports_failed_and_exits_nonzero(
    runner: RunnerProcess, tmp_path: Path
) -> None:
    missing = LoadShard(
        model_dir=str(tmp_path / "missing"), engine="mlx", start_layer=0, end_layer=30, n_layers=30
    )
    assert "missing" in failed_load_reason(runner, missing)


def test_a_stage_without_its_listening_socket_fails_clearly(
    runner: RunnerProcess, model_dir: Path
) -> None:
    """A pipeline stage whose LoadShard names a descriptor it did not inherit fails its load
    with the reason (and exits) instead of loading a stage no neighbour can reach."""
    stage = LoadShard(
        model_dir=str(model_dir),
        engine="mlx",
        start_layer=0,
        end_layer=15,
        n_layers=30,
        listen_fd=99,
    )
    assert "no listening socket at fd 99" in failed_load_reason(runner, stage)


# ---- continuous batching (torch engine) --------------------------------------------------

BATCH_PROMPTS = {
    "story": "Tell me a short story about a brave little robot.",
    "capital": "What is the capital of France? Answer in one sentence.",
    "haiku": "Write a haiku about the sea.",
}
BATCH_TOKENS = 16


def torch_load(model_dir: Path) -> LoadShard:
    return LoadShard(
        model_dir=str(model_dir), engine="torch", start_layer=0, end_layer=30, n_layers=30
    )


@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler: nothing compiles")
def test_a_torch_runner_compiles_while_idle_and_stops_at_once_when_told(
    tmp_path: Path, model_dir: Path
) -> None:
    """Ready once one request's decode step is compiled; the other batch sizes compile while
    the runner has nothing to serve, and a Shutdown during such a compile (seconds, not
    interruptible) ends the runner at once instead of waiting to be killed."""
    log = tmp_path / "runner.stderr"
    with log.open("wb") as stderr:
        # Compiling, not loading what an earlier start saved (test_saved_graphs.py).
        env = {"EXO_RUNNER_LOG_LEVEL": "DEBUG", SAVED_GRAPHS_ENV: "0"}
        process = RunnerProcess(stderr, env)
        try:
            process.send(torch_load(model_dir))
            assert process.statuses_until("ready", "failed")[-1] == "ready"
            text = log.read_text()
            assert "decode steps of batches of 1 ready in" in text, text[-2000:]
            assert "(compiled)" in text, text[-2000:]
            assert "batches of 2, 4, 8 compile when idle" in text, text[-2000:]
            deadline = time.monotonic() + TIMEOUT_S
            while "compiling the decode step of batches of 2" not in log.read_text():
                assert time.monotonic() < deadline, "no compile while idle"
                time.sleep(0.05)
            process.send(Shutdown())
            assert process.wait() == 0
            assert "told to stop while preparing in idle time" in log.read_text()
        finally:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


Ended = tuple[list[TokenChunk], StreamEnd | StreamError]


@pytest.fixture(scope="module")
def torch_runner(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path
) -> Iterator[RunnerProcess]:
    with (tmp_path_factory.mktemp("torch-runner") / "runner.stderr").open("wb") as stderr:
        process = RunnerProcess(stderr)
        try:
            process.send(torch_load(model_dir))
            assert process.statuses_until("ready", "failed")[-1] == "ready"
            yield process
            process.send(Shutdown())
            assert process.wait() == 0
        finally:
            if process.proc.poll() is None:
                process.proc.kill()
                process.proc.wait()


def collect(
    runner: RunnerProcess,
    task_ids: set[str],
    order: list[str] | None = None,
    received: dict[str, list[TokenChunk]] | None = None,
) -> dict[str, Ended]:
    """Every task's chunks and end, in whatever interleaving they arrive; `order` gets
    'started:<id>' and 'end:<id>' events in arrival order; `received` holds chunks read
    before."""
    chunks: dict[str, list[TokenChunk]] = {t: [] for t in task_ids} | (received or {})
    ends: dict[str, Ended] = {}
    while len(ends) < len(task_ids):
        message = runner.recv()
        assert message is not None, "runner exited mid-stream"
        if isinstance(message, GenerationStarted) and order is not None:
            order.append(f"started:{message.task_id}")
        elif isinstance(message, TokenChunk):
            chunks[message.task_id].append(message)
        elif isinstance(message, StreamEnd | StreamError):
            ends[message.task_id] = (chunks[message.task_id], message)
            if order is not None:
                order.append(f"end:{message.task_id}")
    return ends


def token_ids(ended: Ended) -> list[int]:
    chunks, end = ended
    assert isinstance(end, StreamEnd), end
    assert len(chunks) == end.completion_tokens
    return [c.token_id for c in chunks]


@pytest.fixture(scope="module")
def alone(torch_runner: RunnerProcess) -> dict[str, list[int]]:
    """Each prompt's greedy tokens, served with nothing else running."""
    out: dict[str, list[int]] = {}
    for name, content in BATCH_PROMPTS.items():
        torch_runner.send(request(name, content, BATCH_TOKENS))
        out[name] = token_ids(collect(torch_runner, {name})[name])
    return out


def test_batched_requests_equal_each_alone(
    torch_runner: RunnerProcess, alone: dict[str, list[int]]
) -> None:
    for name, content in BATCH_PROMPTS.items():
        torch_runner.send(request(f"b-{name}", content, BATCH_TOKENS))
    order: list[str] = []
    ends = collect(torch_runner, {f"b-{n}" for n in BATCH_PROMPTS}, order)
    for name in BATCH_PROMPTS:
        assert token_ids(ends[f"b-{name}"]) == alone[name], name
    # All three were admitted before the first one finished: they really ran together.
    assert [e.split(":")[0] for e in order[:3]] == ["started"] * 3, order


def test_a_request_joins_mid_stream(
    torch_runner: RunnerProcess, alone: dict[str, list[int]]
) -> None:
    torch_runner.send(request("j-story", BATCH_PROMPTS["story"], BATCH_TOKENS))
    early: list[TokenChunk] = []
    while len(early) < 3:
        message = torch_runner.recv()
        assert message is not None and not isinstance(message, StreamEnd | StreamError)
        if isinstance(message, TokenChunk):
            early.append(message)
    torch_runner.send(request("j-haiku", BATCH_PROMPTS["haiku"], BATCH_TOKENS))
    order: list[str] = []
    ends = collect(torch_runner, {"j-story", "j-haiku"}, order, {"j-story": early})
    assert order.index("started:j-haiku") < order.index("end:j-story"), order
    assert token_ids(ends["j-story"]) == alone["story"]
    assert token_ids(ends["j-haiku"]) == alone["haiku"]


def test_cancelling_one_batched_request_leaves_the_others_intact(
    torch_runner: RunnerProcess, alone: dict[str, list[int]]
) -> None:
    torch_runner.send(request("c-story", BATCH_PROMPTS["story"], BATCH_TOKENS))
    torch_runner.send(request("c-long", "Write a long essay about the sea.", 500))
    torch_runner.send(request("c-capital", BATCH_PROMPTS["capital"], BATCH_TOKENS))
    early: dict[str, list[TokenChunk]] = {"c-story": [], "c-long": [], "c-capital": []}
    while not early["c-long"]:
        message = torch_runner.recv()
        assert message is not None and not isinstance(message, StreamEnd | StreamError)
        if isinstance(message, TokenChunk):
            early[message.task_id].append(message)
    torch_runner.send(Cancel(task_id=TaskId("c-long")))
    ends = collect(torch_runner, {"c-story", "c-long", "c-capital"}, received=early)
    _, long_end = ends["c-long"]
    assert isinstance(long_end, StreamEnd) and long_end.finish_reason == "cancelled"
    assert 1 <= long_end.completion_tokens < 100
    assert token_ids(ends["c-story"]) == alone["story"]
    assert token_ids(ends["c-capital"]) == alone["capital"]
    # The batch is empty again and the runner still serves.
    torch_runner.send(request("c-after", BATCH_PROMPTS["haiku"], BATCH_TOKENS))
    assert token_ids(collect(torch_runner, {"c-after"})["c-after"]) == alone["haiku"]
