"""The runner subprocess: one shard, driven by frames on stdin, answering with frames on stdout.

Lifecycle: LoadShard -> Loading(progress)... -> WarmingUp -> Ready. Shutdown or the end of
stdin exits cleanly (exit code 0); a failed load reports Failed(reason) and exits with code 1.

Generate requests wait in a queue in arrival order. How they leave it depends on the engine:

- An engine with batched decode (`BatchingEngine`: the torch engine) serves up to
  `MAX_BATCH` requests at once (continuous batching). Between decode steps the runner
  admits queued requests while the batch has room, prefilling each alone and emitting its
  first token; then one batched step advances every active request by one token. Each
  request keeps its own text handling and counters (`TokenStream`) and leaves the batch
  (its cache released) at its own end; requests beyond `MAX_BATCH` wait in the queue.
- Any other engine (MLX) serves the queue one request at a time (FIFO) with `generate`.

A shard without every layer is a pipeline stage: it listens for its neighbours before it
loads, links to the next stage once told where it is (ConnectNext), reports Ready only
then, and hands over to `exo.worker.pipeline.stage.StageLoop`.

The runner reports Running while it serves requests and Ready once the queue and the batch
are empty. Cancel drops a queued request or stops a running one before its next token (or
its next prefill chunk).

A reader thread turns stdin frames into messages on a queue; the main thread drains that
queue between tokens, so a Cancel arriving mid-generation takes effect at the next token.

A whole-model engine that defers part of its preparation (`WorksWhenIdle`: the torch
engine's decode graphs for larger batches) does it piece by piece while the queue is empty
and nothing is being served; a message that arrives meanwhile waits for the piece under
way (`exo.worker.runner.idle`). Pipeline stages prepare everything at load.
"""

import json
import queue
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

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
from exo.shared.types.stream import StreamEnd, StreamError
from exo.worker.engines.base import (
    BatchingEngine,
    ChatTokenizer,
    Engine,
    ShardSpec,
    WorksWhenIdle,
    load_engine,
    warm_up,
)
from exo.worker.generate import TokenStream, failed, generate, prefill, prepare_prompt
from exo.worker.pipeline.links import StageListener
from exo.worker.pipeline.stage import StageEvent, StageLoop, new_event_queue
from exo.worker.runner.idle import stop_now_if_idle_working, work_while_idle
from exo.worker.runner.protocol import (
    TO_RUNNER,
    Cancel,
    ConnectNext,
    FrameError,
    FromRunnerMessage,
    Generate,
    GenerationStarted,
    LoadShard,
    Shutdown,
    StatusReport,
    ToRunner,
    encode_frame,
    read_frame_sync,
)

# Loading progress is reported in steps of at least this much.
_PROGRESS_STEP = 0.1
# The most requests a batching engine decodes together; more wait in the queue. Every
# active request holds a KV cache for its whole context, so this also bounds memory.
MAX_BATCH = 8


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
            message = TO_RUNNER.validate_json(payload)
            if isinstance(message, Shutdown):
                stop_now_if_idle_working()
            inbox.put(message)
    except (FrameError, ValueError, OSError) as exc:
        logger.error(f"bad input from supervisor, stopping: {exc}")
    finally:
        stop_now_if_idle_working()
        inbox.put(None)


def _context_length(config_path: Path) -> int:
    """The model's context length (bounds the frames a stage may hold), 8192 if unknown."""
    try:
        config: object = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return 8192
    if not isinstance(config, dict):
        return 8192
    value: object = cast(dict[str, object], config).get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else 8192


def _cancelled_end(task_id: TaskId) -> StreamEnd:
    return StreamEnd(
        task_id=task_id,
        finish_reason="cancelled",
        prompt_tokens=0,
        completion_tokens=0,
        time_to_first_token_ms=0.0,
        decode_tokens_per_s=0.0,
    )


@dataclass
class _Active:
    """A request in the decode batch."""

    task: Generate
    request: object
    stream: TokenStream
    last_token: int


def _shut_down(task_id: TaskId) -> StreamError:
    return StreamError(task_id=task_id, message="runner shut down")


class Runner:
    def __init__(self, inbox: "queue.Queue[ToRunner | None]", out: FrameWriter) -> None:
        self._inbox = inbox
        self._out = out
        self._pending: deque[Generate] = deque()
        # Tasks past the queue (prefilling or decoding), and those of them to cancel.
        self._running: set[TaskId] = set()
        self._cancelled: set[TaskId] = set()
        self._stopping = False
        self._engine: Engine[object, object] | None = None
        self._batching: BatchingEngine[object, object] | None = None
        self._tokenizer: ChatTokenizer | None = None
        self._active: list[_Active] = []
        # Pipeline stages (a shard without every layer): the link to the neighbours.
        self._listener: StageListener | None = None
        self._stage_events: queue.Queue[StageEvent] | None = None
        self._connect_to: ConnectNext | None = None
        self._step_timeout_s = 60.0

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
        if self._listener is not None and self._stage_events is not None:
            assert self._tokenizer is not None
            return StageLoop(
                self._engine,
                self._tokenizer,
                self._inbox,
                self._stage_events,
                self._out.send,
                self._listener,
                self._step_timeout_s,
                self._connect_to,
            ).run()
        self._report(RunnerReady())
        if self._batching is not None:
            return self._run_batched(self._batching)
        while True:
            while not self._pending and not self._stopping:
                self._handle(self._inbox.get())
            if self._stopping:
                for task in self._pending:
                    self._out.send(_shut_down(task.task_id))
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
            if not shard.is_full:
                self._listen(message)
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
        if isinstance(engine, BatchingEngine):
            self._batching = cast(BatchingEngine[object, object], engine)
            logger.info(f"continuous batching of up to {MAX_BATCH} requests")
        return True

    def _listen(self, message: LoadShard) -> None:
        """A pipeline stage listens before it loads, so that its neighbours can link up."""
        if message.listen_fd is None:
            raise ValueError("a pipeline stage needs a listening socket")
        config_path = Path(message.model_dir) / "config.json"
        context = _context_length(config_path)
        self._stage_events = new_event_queue(context)
        try:
            sock = socket.socket(fileno=message.listen_fd)
        except OSError as exc:
            raise ValueError(f"no listening socket at fd {message.listen_fd}: {exc}") from None
        self._listener = StageListener(sock, self._stage_events.put)
        self._step_timeout_s = message.step_timeout_s
        host, port = sock.getsockname()[:2]
        logger.info(f"stage listening on {host}:{port}")

    def _handle(self, message: ToRunner | None) -> None:
        match message:
            case ConnectNext():
                self._connect_to = message
            case LoadShard():
                logger.warning("ignoring a second LoadShard: this runner already has a shard")
            case Generate():
                self._pending.append(message)
            case Cancel(task_id=task_id):
                if task_id in self._running:
                    self._cancelled.add(task_id)
                    return
                queued = [t for t in self._pending if t.task_id == task_id]
                for task in queued:
                    self._pending.remove(task)
                    self._out.send(_cancelled_end(task_id))
            case Shutdown() | None:
                self._stopping = True

    def _drain(self) -> None:
        """Take in whatever arrived, without waiting."""
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            self._handle(message)

    def _should_stop(self, task_id: TaskId) -> bool:
        """Between tokens or prefill chunks: should this running task stop?"""
        self._drain()
        return task_id in self._cancelled or self._stopping

    def _serve(self, task: Generate) -> None:
        """FIFO path: one request from prefill to its end."""
        assert self._engine is not None and self._tokenizer is not None
        task_id = task.task_id
        self._running.add(task_id)
        self._report(RunnerRunning())
        self._out.send(GenerationStarted(task_id=task_id))
        try:
            stream = generate(
                self._engine,
                self._tokenizer,
                task_id,
                task.params,
                lambda: self._should_stop(task_id),
            )
            for message in stream:
                if self._stopping and isinstance(message, StreamEnd):
                    self._out.send(_shut_down(task_id))
                else:
                    self._out.send(message)
        except Exception as exc:
            self._out.send(failed(task_id, exc))
        finally:
            self._running.discard(task_id)
            self._cancelled.discard(task_id)

    # ---- continuous batching -------------------------------------------------------------

    def _run_batched(self, engine: BatchingEngine[object, object]) -> int:
        busy = False
        idle_work = isinstance(engine, WorksWhenIdle)
        while True:
            while not self._pending and not self._active and not self._stopping:
                try:
                    message = self._inbox.get(block=not idle_work)
                except queue.Empty:
                    # Nothing to serve: one piece of the engine's deferred preparation.
                    idle_work = work_while_idle(cast(WorksWhenIdle, engine))
                    continue
                self._handle(message)
            self._drain()
            if self._stopping:
                for active in self._active:
                    self._out.send(_shut_down(active.task.task_id))
                    self._retire(engine, active)
                for task in self._pending:
                    self._out.send(_shut_down(task.task_id))
                return 0
            if not busy:
                self._report(RunnerRunning())
                busy = True
            while self._pending and len(self._active) < MAX_BATCH and not self._stopping:
                self._admit(engine, self._pending.popleft())
            if self._active and not self._stopping:
                self._step(engine)
            self._drain()
            for active in [a for a in self._active if a.task.task_id in self._cancelled]:
                self._out.send(active.stream.end("cancelled"))
                self._retire(engine, active)
            if not self._active and not self._pending and not self._stopping:
                self._report(RunnerReady())
                busy = False

    def _retire(self, engine: BatchingEngine[object, object], active: _Active) -> None:
        if active in self._active:
            self._active.remove(active)
        self._running.discard(active.task.task_id)
        self._cancelled.discard(active.task.task_id)
        engine.release(active.request)

    def _admit(self, engine: BatchingEngine[object, object], task: Generate) -> None:
        """Prefill a request alone and emit its first token; it joins the batch unless that
        token already ended it."""
        assert self._tokenizer is not None
        task_id, sampling = task.task_id, task.params.sampling
        started = time.perf_counter()
        self._running.add(task_id)
        self._out.send(GenerationStarted(task_id=task_id))
        request: object = None
        try:
            prompt, max_tokens = prepare_prompt(engine, self._tokenizer, task.params)
            request = engine.new_request(len(prompt) + max_tokens, sampling.seed)
            stream = TokenStream(
                task_id, self._tokenizer, len(prompt), max_tokens, sampling.stop, started
            )
            active = _Active(task, request, stream, last_token=-1)
            logits = prefill(engine, request, prompt, lambda: self._should_stop(task_id))
            if logits is None:
                self._out.send(_shut_down(task_id) if self._stopping else stream.end("cancelled"))
                self._retire(engine, active)
                return
            active.last_token = engine.read_token(engine.sample(logits, sampling, request))
            for message in stream.push(active.last_token):
                self._out.send(message)
            if stream.finished:
                self._retire(engine, active)
            else:
                self._active.append(active)
        except Exception as exc:
            self._out.send(failed(task_id, exc))
            self._running.discard(task_id)
            self._cancelled.discard(task_id)
            if request is not None:
                engine.release(request)

    def _step(self, engine: BatchingEngine[object, object]) -> None:
        """Advance every active request by one token with one batched pass."""
        batch = list(self._active)
        requests = [a.request for a in batch]
        try:
            x = engine.batch_input([a.last_token for a in batch])
            logits = engine.forward_batch(x, requests)
            samplings = [a.task.params.sampling for a in batch]
            token_ids = engine.read_tokens(engine.sample_batch(logits, samplings, requests))
        except Exception as exc:
            logger.exception("a batched decode step failed")
            for active in batch:
                self._out.send(failed(active.task.task_id, exc, log=False))
                self._retire(engine, active)
            return
        for active, token_id in zip(batch, token_ids, strict=True):
            active.last_token = token_id
            for message in active.stream.push(token_id):
                self._out.send(message)
            if active.stream.finished:
                self._retire(engine, active)
