"""Supervision of one runner subprocess: its frames become events and token streams.

The runner speaks the frame protocol in `runner/protocol.py` on stdin/stdout; its stderr
is the runner's log. A runner that exits unasked, or does not load in time, is reported
as RunnerFailed with the reason, and every task it held ends with a StreamError.
"""

import os
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream
from loguru import logger

from exo.routing import topics
from exo.routing.router import Router
from exo.shared.types.base import Frozen
from exo.shared.types.events import (
    RunnerStatusChanged,
    TaskFailed,
    TaskFinished,
    TaskFirstToken,
    TaskStarted,
)
from exo.shared.types.ids import NodeId, RunnerId, TaskId
from exo.shared.types.instances import EngineName, ShardAssignment
from exo.shared.types.runners import RunnerFailed, RunnerLoading, RunnerStatus, RunnerStopped
from exo.shared.types.stream import StreamEnd, StreamError, StreamMessage, TokenChunk
from exo.shared.types.tasks import Task
from exo.shared.views import EventSink
from exo.worker.cores import cpu_cores, cpu_share, physical_count
from exo.worker.runner.protocol import (
    FROM_RUNNER,
    HEADER_BYTES,
    RUNNER_CPUS_ENV,
    RUNNER_THREADS_ENV,
    TO_RUNNER,
    Cancel,
    ConnectNext,
    FrameError,
    FromRunnerMessage,
    Generate,
    GenerationStarted,
    LoadShard,
    Shutdown,
    StageJoined,
    StageLeft,
    StatusReport,
    ToRunner,
    encode_frame,
    frame_length,
)

# Where torch's inductor keeps compiled graphs (read by torch in the runner).
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
_STDERR_TAIL_LINES = 20
_STOP_GRACE_S = 5.0


class _InFlight:
    def __init__(
        self, task_id: TaskId, owner: NodeId, dispatched: bool, elapsed_ms: float = 0.0
    ) -> None:
        self.task_id = task_id
        # The node whose API holds the client: tokens and errors are published to it.
        self.owner = owner
        # Handed to this runner by its worker (a first stage); else joined in-band (BEGIN).
        self.dispatched = dispatched
        # When it entered the pipeline: a joined stage counts the time at earlier stages.
        self.dispatched_at = time.monotonic() - elapsed_ms / 1000
        self.first_token_seen = False


class StageLink(Frozen):
    """A pipeline stage's listening socket, bound by the worker (its port is already in
    state). The supervisor hands the descriptor to the runner it starts and closes its own
    copy, so the port lives exactly as long as the runner."""

    listen_fd: int
    step_timeout_s: float


# OpenMP spin (iterations) of a torch stage on shared cores: long enough that its threads
# stay awake between the kernels of one step, short enough that they do not hold a core
# once the step is done (measured, two bare stages on 2 cores: 1,000 / 3,000 / 10,000 spins
# 190-208 / 206-218 / 178-207 steps/s, 100 spins 113-120, sleeping at once 131-143).
SHARED_CORES_SPINS = 3000


def runner_env(
    device: str,
    cpu_slot: int = 0,
    cpu_slots: int = 1,
    compile_cache: Path | None = None,
    cores: Mapping[int, tuple[int, int]] | None = None,
    engine: EngineName | None = None,
) -> dict[str, str]:
    """The runner's environment: a "cuda:<i>" shard sees only that GPU, a "cpu" shard none
    (so a torch stage pinned to the CPU stays there on a machine with GPUs), and how a CPU
    stage shares the node's cores (`cpu_sharing_env`; OpenMP settings the user made win).

    `compile_cache` (the node's cache folder) keeps torch's compiled decode steps across
    reboots: inductor's default, /tmp/torchinductor_$USER, is wiped with /tmp, and a cold
    compile of the built-in model takes ~70 s against ~14 s warm. A value the user set wins."""
    env = {k: v for k, v in os.environ.items() if k not in (RUNNER_CPUS_ENV, RUNNER_THREADS_ENV)}
    if compile_cache is not None:
        env.setdefault(INDUCTOR_CACHE_ENV, str(compile_cache))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        sharing = cpu_sharing_env(cpu_slot, cpu_slots, cores, engine)
        env |= {k: v for k, v in sharing.items() if k not in env}
    elif device.startswith("cuda:") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        env["CUDA_VISIBLE_DEVICES"] = device.removeprefix("cuda:")
    return env


def cpu_sharing_env(
    cpu_slot: int,
    cpu_slots: int,
    cores: Mapping[int, tuple[int, int]] | None = None,
    engine: EngineName | None = None,
) -> dict[str, str]:
    """What CPU stage `cpu_slot` of the `cpu_slots` that its instance runs on this node is
    told about the cores it shares (nothing for a lone stage).

    The stages divide the node's physical cores (`cores.cpu_share`). An MLX stage runs on
    its share alone (`RUNNER_CPUS_ENV`, applied by the runner before it starts a thread). A
    torch stage gets two thread counts (`RUNNER_THREADS_ENV`: its share's cores, all the
    cores) and runs on every core: it steps with all of them when no other stage can have
    work (one request in flight: the stages take turns), with its share when several
    requests keep the stages busy at once (`TorchEngine.use_cores`). Measured, two torch
    stages on 2 cores, 1 / 4 streams: 200-216 / 287-296 tokens/s this way, 156-175 /
    298-316 a core each (docs/benchmarks.md, session 8); both on both cores with sleeping
    threads, 93 / 180 (session 6). Where there are fewer cores than stages they share them,
    and their OpenMP threads sleep as soon as they are idle: spinning, the idle stage's
    threads would take the cores from the busy one."""
    if cpu_slots < 2:
        return {}
    cores = cpu_cores() if cores is None else cores
    share = cpu_share(cores, cpu_slot, cpu_slots)
    if share is None:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    if engine == "torch":
        own, every = physical_count(cores, share), physical_count(cores, cores)
        return {RUNNER_THREADS_ENV: f"{own},{every}", "GOMP_SPINCOUNT": str(SHARED_CORES_SPINS)}
    return {RUNNER_CPUS_ENV: ",".join(str(cpu) for cpu in sorted(share))}


class RunnerSupervisor:
    def __init__(
        self,
        *,
        shard: ShardAssignment,
        model_dir: Path,
        emitter: EventSink,
        router: Router,
        load_timeout_s: float,
        on_change: Callable[[], None],
        link: StageLink | None = None,
        cpu_slot: int = 0,
        cpu_slots: int = 1,
        compile_cache: Path | None = None,
    ) -> None:
        self.runner_id: RunnerId = shard.runner_id
        self._cpu_slot = cpu_slot
        self._cpu_slots = cpu_slots
        self._compile_cache = compile_cache
        self._link = link
        # Pipeline stages: where the next stage listens, sent once the shard is loading.
        self._next: ConnectNext | None = None
        self._load_sent = False
        self.linked_to: tuple[str, int] | None = None
        self._shard = shard
        self._model_dir = model_dir
        self._emitter = emitter
        self._router = router
        self._load_timeout_s = load_timeout_s
        self._on_change = on_change
        self._process: Process | None = None
        self._in_flight: dict[TaskId, _InFlight] = {}
        self._stderr_tail: deque[str] = deque(maxlen=_STDERR_TAIL_LINES)
        self._stopping = False
        self._ready = anyio.Event()
        self._last_progress = -1.0
        self.alive = False

    @property
    def in_flight(self) -> dict[TaskId, NodeId]:
        return {task_id: f.owner for task_id, f in self._in_flight.items()}

    @property
    def dispatched(self) -> set[TaskId]:
        """Tasks this worker handed to the runner: only these are cancelled from the control
        plane (a later stage may join a task before its node applied the task's creation;
        cancellation reaches it in-band, as an END frame from the first stage)."""
        return {task_id for task_id, f in self._in_flight.items() if f.dispatched}

    async def run(self) -> None:
        """Start the runner and supervise it until it exits; never raises for runner faults."""
        reason: str | None = None
        link = self._link
        try:
            self._process = await anyio.open_process(
                [sys.executable, "-m", "exo.worker.runner"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=runner_env(
                    self._shard.device,
                    self._cpu_slot,
                    self._cpu_slots,
                    self._compile_cache,
                    engine=self._shard.engine,
                ),
                pass_fds=() if link is None else (link.listen_fd,),
            )
        except OSError as exc:
            await self._report_exit(f"could not start runner: {exc}")
            return
        finally:
            if link is not None:
                os.close(link.listen_fd)
        self.alive = True
        self._on_change()
        logger.info(f"runner {self.runner_id} started (pid {self._process.pid})")
        process = self._process
        code: int | None = None
        stderr_done = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_stderr, process, stderr_done)
                tg.start_soon(self._watch_load)
                await self._send(
                    LoadShard(
                        model_dir=str(self._model_dir),
                        engine=self._shard.engine,
                        start_layer=self._shard.start_layer,
                        end_layer=self._shard.end_layer,
                        n_layers=self._shard.n_layers,
                        listen_fd=None if link is None else link.listen_fd,
                        step_timeout_s=60.0 if link is None else link.step_timeout_s,
                    )
                )
                self._load_sent = True
                if self._next is not None:
                    await self._send(self._next)
                reason = await self._pump_frames(process)
                code = await process.wait()
                with anyio.move_on_after(1.0):  # let the last stderr lines explain the exit
                    await stderr_done.wait()
                tg.cancel_scope.cancel()
            if reason is None and not self._stopping:
                tail = " | ".join(self._stderr_tail)
                reason = f"runner exited with code {code}" + (f": {tail}" if tail else "")
        finally:
            with anyio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()
                await self._report_exit(reason)

    async def _report_exit(self, reason: str | None) -> None:
        self.alive = False
        status: RunnerStatus = RunnerStopped() if reason is None else RunnerFailed(reason=reason)
        if reason is not None:
            logger.error(f"runner {self.runner_id} failed: {reason}")
        await self._emitter.emit(RunnerStatusChanged(runner_id=self.runner_id, status=status))
        for task_id, flight in list(self._in_flight.items()):
            message = f"runner failed: {reason}" if reason else "runner stopped"
            await self._publish(flight.owner, StreamError(task_id=task_id, message=message))
        self._in_flight.clear()
        self._on_change()

    async def _watch_load(self) -> None:
        with anyio.move_on_after(self._load_timeout_s):
            await self._ready.wait()
            return
        logger.error(f"runner {self.runner_id} did not load within {self._load_timeout_s}s")
        self._stderr_tail.append(f"load timed out after {self._load_timeout_s}s")
        if self._process is not None:
            self._process.kill()

    async def _pump_stderr(self, process: Process, done: anyio.Event) -> None:
        assert process.stderr is not None
        buffered = BufferedByteReceiveStream(process.stderr)
        while True:
            try:
                line = (await buffered.receive_until(b"\n", 65536)).decode(errors="replace")
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.DelimiterNotFound):
                done.set()
                return
            self._stderr_tail.append(line)
            logger.debug(f"[{self.runner_id}] {line}")

    async def _pump_frames(self, process: Process) -> str | None:
        """Relay frames until stdout closes; a protocol violation is returned as the reason."""
        assert process.stdout is not None
        buffered = BufferedByteReceiveStream(process.stdout)
        while True:
            try:
                header = await buffered.receive_exactly(HEADER_BYTES)
                payload = await buffered.receive_exactly(frame_length(header))
                message = FROM_RUNNER.validate_json(payload)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return None
            except (FrameError, ValueError) as exc:
                process.kill()
                return f"runner sent a malformed frame: {exc}"
            await self._handle(message)

    async def _handle(self, message: FromRunnerMessage) -> None:
        match message:
            case StageJoined(task_id=task_id, owner=owner, elapsed_ms=elapsed_ms):
                if task_id not in self._in_flight:
                    flight = _InFlight(task_id, owner, dispatched=False, elapsed_ms=elapsed_ms)
                    self._in_flight[task_id] = flight
                    self._on_change()
            case StageLeft(task_id=task_id):
                if self._in_flight.pop(task_id, None) is not None:
                    self._on_change()
            case StatusReport(status=status):
                if isinstance(status, RunnerLoading):
                    if status.progress < 1.0 and status.progress - self._last_progress < 0.1:
                        return  # loading progress is rate-limited: the log is no ticker
                    self._last_progress = status.progress
                if status.kind == "ready" and not self._ready.is_set():
                    self._ready.set()
                    logger.info(f"runner {self.runner_id} ready")
                await self._emitter.emit(
                    RunnerStatusChanged(runner_id=self.runner_id, status=status)
                )
                self._on_change()
            case GenerationStarted(task_id=task_id):
                if task_id in self._in_flight:
                    await self._emitter.emit(TaskStarted(task_id=task_id))
            case TokenChunk(task_id=task_id):
                flight = self._in_flight.get(task_id)
                if flight is None:
                    return
                await self._publish(flight.owner, message)
                if not flight.first_token_seen:
                    flight.first_token_seen = True
                    ttft = (time.monotonic() - flight.dispatched_at) * 1000
                    await self._emitter.emit(
                        TaskFirstToken(task_id=task_id, time_to_first_token_ms=ttft)
                    )
            case StreamEnd(task_id=task_id):
                flight = self._in_flight.pop(task_id, None)
                if flight is None:
                    return
                await self._publish(flight.owner, message)
                await self._emitter.emit(
                    TaskFinished(
                        task_id=task_id,
                        finish_reason=message.finish_reason,
                        prompt_tokens=message.prompt_tokens,
                        completion_tokens=message.completion_tokens,
                        decode_tokens_per_s=message.decode_tokens_per_s,
                    )
                )
                self._on_change()
            case StreamError(task_id=task_id):
                flight = self._in_flight.pop(task_id, None)
                if flight is None:
                    return
                await self._publish(flight.owner, message)
                await self._emitter.emit(TaskFailed(task_id=task_id, reason=message.message))
                self._on_change()

    async def _publish(self, owner: NodeId, message: StreamMessage) -> None:
        await self._router.publish(topics.TOKENS, topics.AddressedStream(to=owner, message=message))

    async def _send(self, message: ToRunner) -> None:
        process = self._process
        if process is None or process.stdin is None or process.returncode is not None:
            raise anyio.BrokenResourceError("runner is not running")
        await process.stdin.send(encode_frame(TO_RUNNER.dump_json(message)))

    async def dispatch(self, task: Task) -> None:
        self._in_flight[task.task_id] = _InFlight(task.task_id, task.owner, dispatched=True)
        try:
            await self._send(Generate(task_id=task.task_id, params=task.params, owner=task.owner))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return  # the exit path reports it with the runner's reason
        except FrameError as exc:  # this task alone: the runner never saw it
            logger.error(f"task {task.task_id} cannot go to runner {self.runner_id}: {exc}")
            self._in_flight.pop(task.task_id, None)
            message = f"the request is too large for the runner: {exc}"
            await self._publish(task.owner, StreamError(task_id=task.task_id, message=message))
            await self._emitter.emit(TaskFailed(task_id=task.task_id, reason=message))
            self._on_change()

    async def connect_next(self, host: str, port: int) -> None:
        """Tell a pipeline stage where the next stage listens (once its shard is loading)."""
        self.linked_to = (host, port)
        self._next = ConnectNext(host=host, port=port)
        if not self._load_sent:
            return  # sent right after LoadShard
        try:
            await self._send(self._next)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return

    async def abort(self, task_id: TaskId) -> None:
        flight = self._in_flight.get(task_id)
        if flight is None:
            return
        try:
            await self._send(Cancel(task_id=task_id))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            return

    async def stop(self) -> None:
        """Ask the runner to exit; kill it if it does not within the grace period."""
        self._stopping = True
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            await self._send(Shutdown())
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        with anyio.move_on_after(_STOP_GRACE_S):
            await process.wait()
            return
        logger.warning(f"runner {self.runner_id} ignored shutdown; killing it")
        process.kill()
