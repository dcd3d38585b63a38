"""The runner subprocess: one shard, driven by frames on stdin, answering with frames on stdout.

Lifecycle: LoadShard -> Loading(progress)... -> WarmingUp -> Ready. Generate requests are
queued and served one at a time in arrival order (FIFO); the runner reports Running while it
serves one and Ready once the queue is empty. Cancel drops a queued request or stops the
running one before its next token. Shutdown or the end of stdin exits cleanly (exit code 0);
a failed load reports Failed(reason) and exits with code 1.

A reader thread turns stdin frames into messages on a queue; the main thread drains that
queue between tokens, so a Cancel arriving mid-generation takes effect at the next token.
"""

import queue
import threading
from collections import deque
from pathlib import Path
from typing import BinaryIO

from loguru import logger

from exo.shared.types.ids import TaskId
from exo.shared.types.runners import (
    RunnerFailed,
    RunnerLoading,
    RunnerReady,
    RunnerRunning,
    RunnerStatus,
    RunnerWarmingUp,
)
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.worker.engines.base import ChatTokenizer, Engine, ShardSpec, load_engine, warm_up
from exo.worker.generate import generate
from exo.worker.runner.protocol import (
    TO_RUNNER,
    Cancel,
    FrameError,
    Generate,
    GenerationStarted,
    LoadShard,
    Shutdown,
    StatusReport,
    ToRunner,
    encode_frame,
    read_frame_sync,
)

FromRunnerMessage = StatusReport | GenerationStarted | TokenChunk | StreamEnd | StreamError
# Loading progress is reported in steps of at least this much.
_PROGRESS_STEP = 0.1


class FrameWriter:
    """Writes whole frames to the supervisor; safe to call from any thread."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: FromRunnerMessage) -> None:
        frame = encode_frame(message.model_dump_json().encode())
        with self._lock:
            self._stream.write(frame)
            self._stream.flush()


def read_messages(stream: BinaryIO, inbox: "queue.Queue[ToRunner | None]") -> None:
    """Reader thread: every message from the supervisor, then None at end of input."""
    try:
        while (payload := read_frame_sync(stream)) is not None:
            inbox.put(TO_RUNNER.validate_json(payload))
    except (FrameError, ValueError, OSError) as exc:
        logger.error(f"bad input from supervisor, stopping: {exc}")
    finally:
        inbox.put(None)


def _cancelled_end(task_id: TaskId) -> StreamEnd:
    return StreamEnd(
        task_id=task_id,
        finish_reason="cancelled",
        prompt_tokens=0,
        completion_tokens=0,
        time_to_first_token_ms=0.0,
        decode_tokens_per_s=0.0,
    )


class Runner:
    def __init__(self, inbox: "queue.Queue[ToRunner | None]", out: FrameWriter) -> None:
        self._inbox = inbox
        self._out = out
        self._pending: deque[Generate] = deque()
        self._current: TaskId | None = None
        self._cancel_current = False
        self._stopping = False
        self._engine: Engine[object, object] | None = None
        self._tokenizer: ChatTokenizer | None = None

    def run(self) -> int:
        """Serve until Shutdown or end of input; the process exit code."""
        while self._engine is None:
            message = self._inbox.get()
            if isinstance(message, LoadShard):
                if not self._load(message):
                    return 1
            else:
                self._handle(message)
            if self._stopping:
                return 0
        self._report(RunnerReady())
        while True:
            while not self._pending and not self._stopping:
                self._handle(self._inbox.get())
            if self._stopping:
                for task in self._pending:
                    self._out.send(StreamError(task_id=task.task_id, message="runner shut down"))
                return 0
            self._serve(self._pending.popleft())
            if not self._pending:
                self._report(RunnerReady())

    def _report(self, status: RunnerStatus) -> None:
        self._out.send(StatusReport(status=status))

    def _load(self, message: LoadShard) -> bool:
        last = -1.0

        def on_progress(progress: float) -> None:
            nonlocal last
            if progress >= 1.0 or progress - last >= _PROGRESS_STEP:
                last = progress
                self._report(RunnerLoading(progress=min(max(progress, 0.0), 1.0)))

        try:
            on_progress(0.0)
            model_dir = Path(message.model_dir)
            shard = ShardSpec(message.start_layer, message.end_layer, message.n_layers)
            engine = load_engine(message.engine, model_dir, shard, on_progress)
            tokenizer = ChatTokenizer.from_dir(model_dir)
            self._report(RunnerWarmingUp())
            warm_up(engine)
        except Exception as exc:
            logger.exception("loading the shard failed")
            self._report(RunnerFailed(reason=f"{type(exc).__name__}: {exc}"))
            return False
        logger.info(f"loaded layers [{shard.start_layer}, {shard.end_layer}) of {model_dir}")
        self._engine, self._tokenizer = engine, tokenizer
        return True

    def _handle(self, message: ToRunner | None) -> None:
        match message:
            case LoadShard():
                logger.warning("ignoring a second LoadShard: this runner already has a shard")
            case Generate():
                self._pending.append(message)
            case Cancel(task_id=task_id):
                if task_id == self._current:
                    self._cancel_current = True
                    return
                queued = [t for t in self._pending if t.task_id == task_id]
                for task in queued:
                    self._pending.remove(task)
                    self._out.send(_cancelled_end(task_id))
            case Shutdown() | None:
                self._stopping = True

    def _poll_cancelled(self) -> bool:
        """Between tokens: take in whatever arrived; should the running task stop?"""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            self._handle(message)
        return self._cancel_current or self._stopping

    def _serve(self, task: Generate) -> None:
        assert self._engine is not None and self._tokenizer is not None
        self._current, self._cancel_current = task.task_id, False
        self._report(RunnerRunning())
        self._out.send(GenerationStarted(task_id=task.task_id))
        try:
            stream = generate(
                self._engine, self._tokenizer, task.task_id, task.params, self._poll_cancelled
            )
            for message in stream:
                if self._stopping and isinstance(message, StreamEnd):
                    self._out.send(StreamError(task_id=task.task_id, message="runner shut down"))
                else:
                    self._out.send(message)
        except Exception as exc:
            logger.exception(f"generation for {task.task_id} failed")
            self._out.send(
                StreamError(task_id=task.task_id, message=f"{type(exc).__name__}: {exc}")
            )
        finally:
            self._current = None
