"""One pipeline stage's runner loop: layers [start, end) of a model, linked to its neighbours.

The stages form a ring. The first stage tokenizes a request, sends BEGIN and the prompt's
hidden states (in prefill chunks) to the second; each stage runs its layers and hands the
result on; the last stage samples, streams the token to its supervisor (which forwards it
to the request's owner) and sends it back to the first stage, which feeds it through its
layers for the next step. END frames travel the ring behind a finished, cancelled or
failed request so that every stage releases its KV cache.

Each stage serves frames in arrival order and never waits for a request's round trip, so
with several requests in flight the stages work on different requests at once. The first
stage admits at most `MAX_ACTIVE` requests; the others wait in its queue. On an engine with
batched decode (torch) the queued one-position steps of several requests run as one pass.

Stages of one instance that share a node's CPU cores (torch) step with all of them while a
step carries every request the stage holds, with their own share otherwise.

Faults: a frame that is wrong for its request fails that request only (a StreamError for
its owner, END along the ring); a lost link fails every request this stage holds and ends
the runner (exit code 1), which marks the instance failed. The first stage fails a request
whose token does not come back within the step timeout.
"""

import math
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from loguru import logger

from exo.shared.types.ids import TaskId
from exo.shared.types.runners import RunnerFailed, RunnerReady, RunnerRunning, RunnerStatus
from exo.shared.types.stream import StreamEnd, StreamError
from exo.worker.engines.base import BatchingEngine, ChatTokenizer, Engine, SharesCores
from exo.worker.generate import PREFILL_CHUNK_TOKENS, TokenStream, failed, prompt_budget
from exo.worker.pipeline.frames import (
    BeginRequest,
    Frame,
    FrameFlag,
    FrameKind,
    FrameRejected,
    check_activation,
    check_begin,
    check_token,
    encode_array,
    encode_begin,
    encode_end,
    encode_token,
)
from exo.worker.pipeline.links import LinkLost, Received, StageListener, StageSender
from exo.worker.runner.protocol import (
    Cancel,
    ConnectNext,
    FromRunnerMessage,
    Generate,
    GenerationStarted,
    LoadShard,
    Shutdown,
    StageJoined,
    StageLeft,
    StatusReport,
    ToRunner,
)

# Requests the first stage keeps in the pipeline at once; each holds a KV cache per stage.
MAX_ACTIVE = 8
CONNECT_TIMEOUT_S = 60.0
# After a lost link, how long a Shutdown may take to arrive before the runner reports failure.
_SHUTDOWN_GRACE_S = 1.0
# Ids of requests released lately: frames still in flight for them are dropped quietly.
_ENDED_MEMORY = 4096

StageEvent = ToRunner | Received | LinkLost | None


def event_queue_size(context_length: int) -> int:
    """Room for every frame that can be in flight at once (MAX_ACTIVE requests, each with
    its prefill chunks, BEGIN, END and a decode frame), so no put ever waits in a ring."""
    chunks = math.ceil(context_length / PREFILL_CHUNK_TOKENS) + 1
    return MAX_ACTIVE * (chunks + 3) + 64


def new_event_queue(context_length: int) -> "queue.Queue[StageEvent]":
    return queue.Queue(maxsize=event_queue_size(context_length))


@dataclass
class _Request:
    begin: BeginRequest
    handle: object
    # Tokens in this stage's cache: the position the next frame must start at.
    position: int = 0
    # First stage: prompt chunks still to send, and when the next token must be back.
    chunks: deque[list[int]] = field(default_factory=deque[list[int]])
    prefill_chunks: int = 0
    deadline: float | None = None
    # Last stage: text handling and counters.
    stream: TokenStream | None = None

    @property
    def task_id(self) -> TaskId:
        return self.begin.task_id


class StageLoop:
    def __init__(
        self,
        engine: Engine[object, object],
        tokenizer: ChatTokenizer,
        inbox: "queue.Queue[ToRunner | None]",
        events: "queue.Queue[StageEvent]",
        send: Callable[[FromRunnerMessage], None],
        listener: StageListener,
        step_timeout_s: float,
        connect_to: ConnectNext | None = None,
    ) -> None:
        self._engine = engine
        self._batching = isinstance(engine, BatchingEngine)
        self._cores = engine if isinstance(engine, SharesCores) else None
        self._tokenizer = tokenizer
        self._inbox = inbox
        self._events = events
        self._send = send
        self._listener = listener
        self._step_timeout_s = step_timeout_s
        self._connect_to = connect_to
        self._first = engine.shard.is_first
        self._last = engine.shard.is_last
        self._next: StageSender | None = None
        # First stage: requests not yet begun, with when each arrived (BEGIN carries the wait).
        self._pending: deque[tuple[Generate, float]] = deque()
        self._active: dict[str, _Request] = {}
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._stopping = False
        self._lost: str | None = None
        self._busy = False

    # ---- lifecycle ------------------------------------------------------------------

    def run(self) -> int:
        """Connect to the next stage, report Ready, serve; the process exit code."""
        threading.Thread(target=self._forward_control, name="stage-control", daemon=True).start()
        try:
            while self._next is None:
                if self._connect_to is not None:
                    target = self._connect_to
                    try:
                        self._next = StageSender.connect(
                            target.host, target.port, CONNECT_TIMEOUT_S
                        )
                    except ConnectionError as exc:
                        self._report(RunnerFailed(reason=str(exc)))
                        return 1
                    logger.info(f"linked to the next stage at {self._next.target}")
                    break
                self._handle(self._events.get())
                if self._stopping:
                    return self._shut_down()
            self._report(RunnerReady())
            return self._serve()
        finally:
            self._listener.close()
            if self._next is not None:
                self._next.close()

    def _forward_control(self) -> None:
        """The supervisor's messages join the frames on one queue, in arrival order."""
        while True:
            message = self._inbox.get()
            self._events.put(message)
            if message is None:
                return

    def _serve(self) -> int:
        while True:
            self._drain()
            if self._stopping:
                return self._shut_down()
            if self._lost is not None:
                return self._fail_link(self._lost)
            self._expire()
            worked = self._prefill_step() or self._admit()
            self._update_status()
            if worked:
                continue
            try:
                event = self._events.get(timeout=self._wait_s())
            except queue.Empty:
                continue
            self._handle(event)

    def _drain(self) -> None:
        """Handle what is queued now (not what arrives meanwhile: prefill must progress).

        On an engine with batched decode the queued one-position steps of different
        requests run as one pass, after the other events (a request has at most one step
        in flight, so its own frames stay in order; one released meanwhile is skipped)."""
        steps: list[Frame] = []
        for _ in range(self._events.qsize()):
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if isinstance(event, Received) and self._batchable(event.frame):
                steps.append(event.frame)
            else:
                self._handle(event)
        if len(steps) == 1:
            self._on_frame(steps[0])
        elif steps:
            self._decode_batch(steps)

    def _wait_s(self) -> float | None:
        deadlines = [r.deadline for r in self._active.values() if r.deadline is not None]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    def _report(self, status: RunnerStatus) -> None:
        self._send(StatusReport(status=status))

    def _update_status(self) -> None:
        busy = bool(self._active or self._pending)
        if busy != self._busy:
            self._busy = busy
            self._report(RunnerRunning() if busy else RunnerReady())

    def _shut_down(self) -> int:
        for req in list(self._active.values()):
            self._send(StreamError(task_id=req.task_id, message="runner shut down"))
            self._release(req)
        for task, _ in self._pending:
            self._send(StreamError(task_id=task.task_id, message="runner shut down"))
        self._pending.clear()
        return 0

    def _fail_link(self, reason: str) -> int:
        logger.error(f"pipeline link lost, failing {len(self._active)} requests: {reason}")
        for req in list(self._active.values()):
            self._send(StreamError(task_id=req.task_id, message=f"pipeline failed: {reason}"))
            self._release(req)
        for task, _ in self._pending:
            self._send(StreamError(task_id=task.task_id, message=f"pipeline failed: {reason}"))
        self._pending.clear()
        # A neighbour that was told to stop closes its links a moment before this runner
        # hears the same: that is a shutdown, not a failure of the instance.
        deadline = time.monotonic() + _SHUTDOWN_GRACE_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self._events.get(timeout=left)
            except queue.Empty:
                break
            if event is None or isinstance(event, Shutdown):
                return 0
        self._report(RunnerFailed(reason=reason))
        return 1

    # ---- events ---------------------------------------------------------------------

    def _handle(self, event: StageEvent) -> None:
        match event:
            case None | Shutdown():
                self._stopping = True
            case Received(frame=frame):
                self._on_frame(frame)
            case LinkLost(reason=reason):
                self._lost = self._lost or reason
            case Generate():
                if self._first:
                    self._pending.append((event, time.perf_counter()))
                else:
                    message = "Generate sent to a pipeline stage other than the first"
                    self._send(StreamError(task_id=event.task_id, message=message))
            case Cancel(task_id=task_id):
                self._cancel(task_id)
            case ConnectNext():
                if self._next is None:
                    self._connect_to = event
                else:
                    logger.warning("ignoring a second ConnectNext: this stage is linked")
            case LoadShard():
                logger.warning("ignoring a second LoadShard: this runner already has a shard")

    def _cancel(self, task_id: TaskId) -> None:
        queued = [q for q in self._pending if q[0].task_id == task_id]
        for q in queued:
            self._pending.remove(q)
            self._send(_cancelled_end(task_id))
        req = self._active.get(task_id)
        if req is not None:
            self._release(req)
            self._send_next(encode_end(task_id, "cancelled", error=False))
        else:
            self._remember_ended(task_id)  # a BEGIN still on its way is dropped

    def _on_frame(self, frame: Frame) -> None:
        try:
            match frame.kind:
                case FrameKind.BEGIN:
                    self._on_begin(frame)
                case FrameKind.ACTIVATION:
                    self._on_activation(frame)
                case FrameKind.TOKEN:
                    self._on_token(frame)
                case FrameKind.END:
                    self._on_end(frame)
        except FrameRejected as exc:
            self._reject(frame.request_id, str(exc))
        except Exception as exc:
            logger.exception(f"stage failed on a frame of {frame.request_id}")
            req = self._active.get(frame.request_id)
            if req is not None:
                self._fail(req, f"{type(exc).__name__}: {exc}")

    def _reject(self, request_id: str, reason: str) -> None:
        logger.error(f"rejected an activation frame of {request_id}: {reason}")
        message = f"malformed activation frame: {reason}"
        req = self._active.get(request_id)
        if req is not None:
            self._fail(req, message)
        elif request_id not in self._ended:
            # Not a request this stage holds: its owner (if any supervisor knows it) is told,
            # and the stages downstream release it.
            self._send(StreamError(task_id=TaskId(request_id), message=message))
            self._remember_ended(request_id)
            self._send_next(encode_end(request_id, message, error=True))

    def _unknown(self, frame: Frame) -> None:
        if frame.request_id in self._ended:
            return  # cancelled or failed here while the frame travelled: expected
        raise FrameRejected(f"{frame.kind.name} for unknown request {frame.request_id}")

    def _on_begin(self, frame: Frame) -> None:
        arrived = time.perf_counter()
        if self._first:
            raise FrameRejected("BEGIN received by the first stage")
        begin = check_begin(frame)
        if begin.task_id in self._active:
            raise FrameRejected("a second BEGIN for a request in flight")
        if begin.task_id in self._ended:
            return
        handle = self._engine.new_request(begin.context_tokens, begin.params.sampling.seed)
        req = _Request(begin, handle)
        if self._last:
            sampling = begin.params.sampling
            req.stream = TokenStream(
                begin.task_id,
                self._tokenizer,
                begin.prompt_tokens,
                begin.max_tokens,
                sampling.stop,
                arrived - begin.elapsed_ms / 1000,
            )
        self._active[begin.task_id] = req
        self._send(
            StageJoined(task_id=begin.task_id, owner=begin.owner, elapsed_ms=begin.elapsed_ms)
        )
        if not self._last:
            elapsed_ms = begin.elapsed_ms + (time.perf_counter() - arrived) * 1000
            self._send_next(encode_begin(begin.model_copy(update={"elapsed_ms": elapsed_ms})))

    def _on_activation(self, frame: Frame) -> None:
        if self._first:
            raise FrameRejected("ACTIVATION received by the first stage")
        req = self._active.get(frame.request_id)
        if req is None:
            return self._unknown(frame)
        x = check_activation(frame, self._engine.hidden_size)
        n = int(x.shape[1])
        if frame.step != req.position:
            raise FrameRejected(f"step {frame.step} where position {req.position} was expected")
        if req.position + n > req.begin.context_tokens:
            raise FrameRejected(f"positions beyond the request's {req.begin.context_tokens}")
        self._claim_cores(1)
        out = self._engine.forward(self._engine.from_numpy(x), req.handle)
        req.position += n
        if not self._last:
            hidden = self._engine.to_numpy(out)
            self._send_next(
                encode_array(FrameKind.ACTIVATION, req.task_id, frame.step, frame.flags, hidden)
            )
            return
        if not frame.flags & FrameFlag.SAMPLE:
            self._engine.schedule_cache(req.handle)  # a prefill chunk: fill the cache only
            return
        sampling = req.begin.params.sampling
        token = self._engine.read_token(self._engine.sample(out, sampling, req.handle))
        self._emit_token(req, token)

    def _on_token(self, frame: Frame) -> None:
        if not self._first:
            raise FrameRejected("TOKEN received by a stage other than the first")
        req = self._active.get(frame.request_id)
        if req is None:
            return self._unknown(frame)
        token = check_token(frame)
        if frame.step != req.position:
            raise FrameRejected(f"token for step {frame.step} at position {req.position}")
        if frame.flags & FrameFlag.FINAL:
            self._release(req)
            self._send_next(encode_end(req.task_id, "finished", error=False))
            return
        self._claim_cores(1)
        out = self._engine.forward(self._engine.token_input([token]), req.handle)
        hidden = self._engine.to_numpy(out)
        self._send_next(
            encode_array(FrameKind.ACTIVATION, req.task_id, req.position, FrameFlag.SAMPLE, hidden)
        )
        req.position += 1
        req.deadline = time.monotonic() + self._step_timeout_s

    def _on_end(self, frame: Frame) -> None:
        req = self._active.get(frame.request_id)
        if req is None:
            return  # came round the ring to where it started, or never got here
        self._release(req)
        reason = frame.payload.decode(errors="replace")
        error = bool(frame.flags & FrameFlag.ERROR)
        self._send_next(encode_end(req.task_id, reason, error=error))

    def _claim_cores(self, rows: int) -> None:
        """A step of `rows` requests: when they are all the requests this stage holds, the
        other stages of the ring have nothing to do (one stream: the stages take turns), so
        an engine sharing a node's cores with them may take all of the cores."""
        if self._cores is not None:
            self._cores.use_cores(rows >= len(self._active))

    # ---- batched decode (engines with `forward_batch`) --------------------------------

    def _batchable(self, frame: Frame) -> bool:
        if not self._batching or frame.request_id not in self._active:
            return False
        if frame.kind == FrameKind.TOKEN:
            return self._first and not frame.flags & FrameFlag.FINAL
        return (
            frame.kind == FrameKind.ACTIVATION
            and not self._first
            and bool(frame.flags & FrameFlag.SAMPLE)
            and len(frame.shape) == 3
            and frame.shape[1] == 1
        )

    def _decode_batch(self, frames: list[Frame]) -> None:
        """One position for each of several requests, in one forward pass."""
        engine: BatchingEngine[object, object] = self._engine  # pyright: ignore[reportAssignmentType]
        reqs: list[_Request] = []
        tokens: list[int] = []
        hidden: list[npt.NDArray[Any]] = []
        for frame in frames:
            req = self._active.get(frame.request_id)
            if req is None:
                continue  # released by an event handled before this batch
            try:
                if frame.step != req.position:
                    raise FrameRejected(f"step {frame.step} at position {req.position}")
                if frame.kind == FrameKind.TOKEN:
                    tokens.append(check_token(frame))
                else:
                    if req.position + 1 > req.begin.context_tokens:
                        raise FrameRejected("a position beyond the request's context")
                    hidden.append(check_activation(frame, engine.hidden_size))
            except FrameRejected as exc:
                self._reject(frame.request_id, str(exc))
                continue
            reqs.append(req)
        if not reqs:
            return
        try:
            if self._first:
                x = engine.batch_input(tokens)
            else:
                x = engine.from_numpy(np.concatenate(hidden, axis=0))
            self._claim_cores(len(reqs))
            out = engine.forward_batch(x, [r.handle for r in reqs])
            if self._last:
                samplings = [r.begin.params.sampling for r in reqs]
                sampled = engine.read_tokens(
                    engine.sample_batch(out, samplings, [r.handle for r in reqs])
                )
                rows: list[npt.NDArray[Any]] = []
            else:
                sampled = []
                rows = list(engine.to_numpy(out))
        except Exception as exc:
            logger.exception(f"a batched step of {len(reqs)} requests failed")
            for req in reqs:
                self._fail(req, f"{type(exc).__name__}: {exc}")
            return
        now = time.monotonic()
        for i, req in enumerate(reqs):
            step = req.position
            req.position += 1
            if not self._last:
                frame = encode_array(
                    FrameKind.ACTIVATION, req.task_id, step, FrameFlag.SAMPLE, rows[i][None]
                )
                self._send_next(frame)
                if self._first:
                    req.deadline = now + self._step_timeout_s
                continue
            self._emit_token(req, sampled[i])

    def _emit_token(self, req: _Request, token: int) -> None:
        """Last stage: the sampled token to the first stage and to the owner's stream."""
        assert req.stream is not None
        messages = req.stream.push(token)
        final = req.stream.finished
        # The token goes round first: the first stage starts the next step sooner.
        self._send_next(encode_token(req.task_id, req.position, token, final))
        for message in messages:
            self._send(message)
        if final:
            self._release(req, tell_supervisor=False)

    # ---- the first stage's own work -------------------------------------------------

    def _admit(self) -> bool:
        if not self._first or not self._pending or len(self._active) >= MAX_ACTIVE:
            return False
        task, queued_at = self._pending.popleft()
        task_id = task.task_id
        self._send(GenerationStarted(task_id=task_id))
        try:
            if task.owner is None:
                raise ValueError("a pipeline request needs its owner node")
            prompt, max_tokens = prompt_budget(
                self._tokenizer, task.params, self._engine.context_length
            )
            context = len(prompt) + max_tokens
            handle = self._engine.new_request(context, task.params.sampling.seed)
        except Exception as exc:
            self._send(failed(task_id, exc))
            return True
        begin = BeginRequest(
            task_id=task_id,
            owner=task.owner,
            params=task.params,
            prompt_tokens=len(prompt),
            max_tokens=max_tokens,
            context_tokens=context,
            elapsed_ms=(time.perf_counter() - queued_at) * 1000,
        )
        # As in single-stage prefill: body chunks fill the caches, the last token samples.
        body = prompt[:-1]
        chunks = deque(
            body[i : i + PREFILL_CHUNK_TOKENS] for i in range(0, len(body), PREFILL_CHUNK_TOKENS)
        )
        chunks.append(prompt[-1:])
        req = _Request(begin, handle, chunks=chunks, prefill_chunks=len(chunks))
        self._active[task_id] = req
        self._send_next(encode_begin(begin))
        return True

    def _prefill_step(self) -> bool:
        """One prompt chunk of the oldest request still prefilling."""
        req = next((r for r in self._active.values() if r.chunks), None)
        if req is None:
            return False
        chunk = req.chunks.popleft()
        try:
            self._claim_cores(1)
            out = self._engine.forward(self._engine.token_input(chunk), req.handle)
            hidden = self._engine.to_numpy(out)
        except Exception as exc:
            logger.exception(f"prefill of {req.task_id} failed")
            self._fail(req, f"{type(exc).__name__}: {exc}")
            return True
        flags = FrameFlag.NONE if req.chunks else FrameFlag.SAMPLE
        self._send_next(
            encode_array(FrameKind.ACTIVATION, req.task_id, req.position, flags, hidden)
        )
        req.position += len(chunk)
        if not req.chunks:
            # Every downstream stage prefills the whole prompt before the first token.
            req.deadline = time.monotonic() + self._step_timeout_s * req.prefill_chunks
        return True

    def _expire(self) -> None:
        now = time.monotonic()
        for req in [r for r in self._active.values() if r.deadline and now > r.deadline]:
            self._fail(
                req,
                f"no token came back from the pipeline within {self._step_timeout_s:g}s "
                "(a stage is stuck or gone)",
            )

    # ---- helpers --------------------------------------------------------------------

    def _fail(self, req: _Request, message: str) -> None:
        logger.error(f"request {req.task_id} failed at this stage: {message}")
        self._send(StreamError(task_id=req.task_id, message=message))
        self._release(req, tell_supervisor=False)
        self._send_next(encode_end(req.task_id, message, error=True))

    def _release(self, req: _Request, tell_supervisor: bool = True) -> None:
        self._active.pop(req.task_id, None)
        self._remember_ended(req.task_id)
        if self._batching:
            engine: BatchingEngine[object, object] = self._engine  # pyright: ignore[reportAssignmentType]
            engine.release(req.handle)
        if tell_supervisor:
            self._send(StageLeft(task_id=req.task_id))

    def _remember_ended(self, request_id: str) -> None:
        self._ended[request_id] = None
        while len(self._ended) > _ENDED_MEMORY:
            self._ended.popitem(last=False)

    def _send_next(self, frame: bytes) -> None:
        """A frame to the next stage; a failure is recorded for the serve loop, which then
        fails every request this stage holds (the link carries them all)."""
        if self._next is None:
            self._lost = self._lost or "no link to the next stage"
            return
        try:
            self._next.send(frame)
        except OSError as exc:
            self._lost = self._lost or f"link to the next stage {self._next.target} lost: {exc}"


def _cancelled_end(task_id: TaskId) -> StreamEnd:
    return StreamEnd(
        task_id=task_id,
        finish_reason="cancelled",
        prompt_tokens=0,
        completion_tokens=0,
        time_to_first_token_ms=0.0,
        decode_tokens_per_s=0.0,
    )
