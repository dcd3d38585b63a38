"""Two bare engine stages taking turns: the fastest any hand-off could make this split.

`bench_pipeline.py` starts two of these (the first and the last stage of the 2-stage
split, in processes of their own, on the CPUs the pipeline's stages get). They pass one
byte back and forth over a Unix socket pair inherited from the parent, so each step of one
stage waits for the other's, as a one-stream pipeline's stages do, with no frames, no
stage loop and no runner around them. Their rate against the pipeline's tells the hand-off
apart from what splitting the model on one machine costs by itself (two processes taking
turns on its caches and memory, a fixed cost per step paid twice).

`both` loads the two stages into one process and steps them in turn on one thread (FD is
ignored): the split with no second process, so no second set of threads to wake, against
the two processes taking turns.

    python -m bench.stage_pingpong first|last|both ENGINE MODEL_DIR FD STEPS ROUNDS

Prints `READY` once loaded and starts at a line on stdin; the first stage (or `both`) then
prints one JSON line per round: {"steps_per_s": ...} (a step of each stage = one token).
"""

import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from exo.shared.types.chat import SamplingParams
from exo.shared.types.instances import EngineName
from exo.worker.engines.base import (
    BatchingEngine,
    Engine,
    ShardSpec,
    SharesCores,
    load_engine,
    warm_up,
)

GREEDY = SamplingParams(max_tokens=1, temperature=0.0, top_p=1.0)
# The 2-stage split of the built-in model's 30 layers.
FIRST, LAST = ShardSpec(0, 15, 30), ShardSpec(15, 30, 30)


def step(engine: Engine[Any, Any], request: object, i: int) -> None:
    """What the stage does for one token of one stream."""
    if engine.shard.is_first:
        x = engine.token_input([100 + i % 50])
    else:
        hidden = np.random.default_rng(i).standard_normal((1, 1, engine.hidden_size))
        x = engine.from_numpy(hidden.astype(np.float16))
    if isinstance(engine, SharesCores):
        engine.use_cores(True)  # one stream: the other stage waits for this one
    out = engine.forward(x, request)
    if engine.shard.is_last:
        engine.read_token(engine.sample(out, GREEDY, request))
    else:
        engine.to_numpy(out)


def loaded(name: EngineName, model_dir: str, shard: ShardSpec) -> Engine[Any, Any]:
    engine = load_engine(name, Path(model_dir), shard, lambda _: None)
    warm_up(engine)
    return engine


def one_process(engines: tuple[Engine[Any, Any], Engine[Any, Any]], steps: int) -> float:
    """Steps/s of both stages of the split taking turns on this thread."""
    requests = [engine.new_request(steps + 48, seed=0) for engine in engines]
    started = time.perf_counter()
    for i in range(steps):
        for engine, request in zip(engines, requests, strict=True):
            step(engine, request, i)
    rate = steps / (time.perf_counter() - started)
    for engine, request in zip(engines, requests, strict=True):
        if isinstance(engine, BatchingEngine):
            engine.release(request)
    return rate


def main() -> None:
    role, engine_name, model_dir, fd, steps, rounds = sys.argv[1:7]
    name: EngineName = "torch" if engine_name == "torch" else "mlx"
    if role == "both":
        engines = (loaded(name, model_dir, FIRST), loaded(name, model_dir, LAST))
        print("READY", flush=True)
        sys.stdin.readline()
        for _ in range(int(rounds)):
            print(json.dumps({"steps_per_s": one_process(engines, int(steps))}), flush=True)
        return
    engine = loaded(name, model_dir, FIRST if role == "first" else LAST)
    link = socket.socket(fileno=int(fd))
    print("READY", flush=True)
    sys.stdin.readline()  # both loaded: go
    for _ in range(int(rounds)):
        n = int(steps)
        # Room for a 40-token prompt and the steps, as in the pipeline's requests.
        request = engine.new_request(n + 48, seed=0)
        started = time.perf_counter()
        for i in range(n):
            if role == "first":
                step(engine, request, i)
                link.sendall(b"x")
                link.recv(1)
            else:
                link.recv(1)
                step(engine, request, i)
                link.sendall(b"x")
        if role == "first":
            print(json.dumps({"steps_per_s": n / (time.perf_counter() - started)}), flush=True)
        if isinstance(engine, BatchingEngine):
            engine.release(request)


if __name__ == "__main__":
    main()
