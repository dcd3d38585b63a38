"""The runner as a real subprocess, driven through its frame protocol."""

import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, BinaryIO, cast

import pytest

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
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
    def __init__(self, stderr: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exo.worker.runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
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


def test_bad_model_dir_reports_failed_and_exits_nonzero(
    runner: RunnerProcess, tmp_path: Path
) -> None:
    runner.send(
        LoadShard(
            model_dir=str(tmp_path / "missing"),
            engine="mlx",
            start_layer=0,
            end_layer=30,
            n_layers=30,
        )
    )
    seen: list[StatusReport] = []
    while (message := runner.recv()) is not None:
        assert isinstance(message, StatusReport)
        seen.append(message)
    assert seen[-1].status.kind == "failed"
    assert "missing" in getattr(seen[-1].status, "reason", "")
    assert runner.wait() != 0
