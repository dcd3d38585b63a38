"""Pipeline stages as real runner subprocesses on loopback, driven through their protocol
the way the worker drives them (LoadShard with a listen port, ConnectNext, Generate)."""

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, BinaryIO, cast

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import NodeId, TaskId
from exo.shared.types.instances import EngineName
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.worker.pipeline.links import listen_socket
from exo.worker.runner.protocol import (
    FROM_RUNNER,
    ConnectNext,
    FromRunner,
    Generate,
    LoadShard,
    Shutdown,
    StatusReport,
    ToRunner,
    encode_frame,
    read_frame_sync,
)

TIMEOUT_S = 180.0
OWNER = NodeId("node-test")


class StageProcess:
    def __init__(
        self,
        stderr: IO[bytes],
        env: dict[str, str],
        cpus: set[int] | None = None,
        listen: socket.socket | None = None,
    ) -> None:
        """`listen`: the stage's listening socket, handed to the runner as the worker does."""

        def pin() -> None:
            if cpus is not None:
                os.sched_setaffinity(0, cpus)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exo.worker.runner"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            preexec_fn=pin,
            pass_fds=() if listen is None else (listen.fileno(),),
        )
        self.received: queue.Queue[FromRunner | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while (payload := read_frame_sync(cast(BinaryIO, self.proc.stdout))) is not None:
            self.received.put(FROM_RUNNER.validate_json(payload))
        self.received.put(None)

    def send(self, message: ToRunner) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(encode_frame(message.model_dump_json().encode()))
        self.proc.stdin.flush()

    def recv(self, timeout_s: float = TIMEOUT_S) -> FromRunner | None:
        return self.received.get(timeout=timeout_s)

    def wait_status(self, *kinds: str) -> str:
        while True:
            message = self.recv()
            assert message is not None, "runner exited"
            if isinstance(message, StatusReport) and message.status.kind in (*kinds, "failed"):
                return message.status.kind

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Chain:
    """Stages [(engine, start, end), ...] covering the model, linked in a ring."""

    def __init__(
        self,
        model_dir: Path,
        stages: Sequence[tuple[EngineName, int, int]],
        log_dir: Path,
        n_layers: int = 30,
        env: dict[str, str] | None = None,
        step_timeout_s: float = 60.0,
        cpus: Sequence[set[int]] | None = None,
    ) -> None:
        """`cpus`: the CPUs each stage may run on (its threads follow: device.physical_cores),
        as if each stage were a node of its own; all of them when None."""
        self.stages: list[StageProcess] = []
        self.ports: list[int] = []
        self._logs: list[IO[bytes]] = []
        for i, (engine, start, end) in enumerate(stages):
            log = (log_dir / f"stage{i}.stderr").open("wb")
            self._logs.append(log)
            # Each stage is its own "node": separate EXO_HOMEs as on separate machines.
            home = log_dir / f"home{i}"
            stage_env = {**os.environ, **(env or {}), "EXO_HOME": str(home)}
            full = start == 0 and end == n_layers
            with listen_socket("127.0.0.1") as listen:  # the runner keeps its own copy
                process = StageProcess(
                    log, stage_env, None if cpus is None else cpus[i], None if full else listen
                )
                port = int(listen.getsockname()[1])
                listen_fd = listen.fileno()
            process.send(
                LoadShard(
                    model_dir=str(model_dir),
                    engine=engine,
                    start_layer=start,
                    end_layer=end,
                    n_layers=n_layers,
                    listen_fd=None if full else listen_fd,
                    step_timeout_s=step_timeout_s,
                )
            )
            self.stages.append(process)
            self.ports.append(port)
        if len(stages) > 1:
            for i, process in enumerate(self.stages):
                nxt = self.ports[(i + 1) % len(self.stages)]
                process.send(ConnectNext(host="127.0.0.1", port=nxt))
        for process in self.stages:
            kind = process.wait_status("ready")
            assert kind == "ready", f"a stage failed to load: {self.log_text()}"

    @property
    def first(self) -> StageProcess:
        return self.stages[0]

    @property
    def last(self) -> StageProcess:
        return self.stages[-1]

    def log_text(self) -> str:
        return "\n".join(
            f"--- stage {i}\n" + Path(log.name).read_text(errors="replace")[-3000:]
            for i, log in enumerate(self._logs)
        )

    def generate(self, task: str, content: str, max_tokens: int = 32) -> None:
        self.first.send(request(task, content, max_tokens))

    def collect(
        self, tasks: Sequence[str], timeout_s: float = TIMEOUT_S
    ) -> dict[str, tuple[list[int], StreamEnd | StreamError]]:
        """Each task's token ids and its end, as the stages report them (errors from any)."""
        tokens: dict[str, list[int]] = {t: [] for t in tasks}
        ends: dict[str, StreamEnd | StreamError] = {}
        deadline = time.monotonic() + timeout_s
        while len(ends) < len(tasks):
            got = False
            for process in self.stages:
                try:
                    message = process.received.get(timeout=0.02)
                except queue.Empty:
                    continue
                got = True
                if message is None:
                    continue
                if isinstance(message, TokenChunk) and message.task_id in tokens:
                    tokens[message.task_id].append(message.token_id)
                elif (
                    isinstance(message, StreamEnd | StreamError)
                    and message.task_id in tokens
                    and message.task_id not in ends
                ):
                    ends[message.task_id] = message
            if not got and time.monotonic() > deadline:
                raise TimeoutError(f"no end for {set(tasks) - set(ends)}:\n{self.log_text()}")
        return {t: (tokens[t], ends[t]) for t in tasks}

    def close(self) -> None:
        for process in self.stages:
            try:
                process.send(Shutdown())
            except OSError:
                pass
        for process in self.stages:
            try:
                process.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for log in self._logs:
            log.close()


def request(task: str, content: str, max_tokens: int = 32) -> Generate:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0)
    params = ChatParams(messages=(ChatMessage(role="user", content=content),), sampling=sampling)
    return Generate(task_id=TaskId(task), params=params, owner=OWNER)
