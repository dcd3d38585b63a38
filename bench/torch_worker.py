"""One engine of `bench_torch.py`, loaded in a process of its own.

Each engine runs in its own process, as a runner does in the daemon: engines in one
process share its threads and allocator, and the compiled torch step has run at half
speed in a big bench process while it ran at full speed in every runner (see
docs/torch_engine.md). The parent sends one command a line on stdin; each answer is one
JSON line on stdout, after a line `READY` once loaded:

    run            -> {"ttft_s": ..., "decode_tps": ...}   (one greedy generation)
    streams K      -> {"tps": ...}                         (K requests batched; ours only)

    python -m bench.torch_worker ours|eager|mlx_lm|transformers MODEL_DIR TOKENS
"""

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def _timed(started: float, times: list[float]) -> dict[str, float]:
    return {"ttft_s": times[0] - started, "decode_tps": (len(times) - 1) / (times[-1] - times[0])}


def ours(model_dir: Path, n: int, compiled: bool) -> dict[str, Callable[[list[str]], Any]]:
    import torch

    from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
    from exo.shared.types.ids import TaskId
    from exo.worker.engines.base import ChatTokenizer, ShardSpec, warm_up
    from exo.worker.engines.torch.engine import TorchEngine
    from exo.worker.generate import generate

    started = time.perf_counter()
    engine = TorchEngine.load(model_dir, ShardSpec(0, 30, 30), lambda _: None)
    load_s = time.perf_counter() - started
    if not compiled:
        engine.decoder = None
    warm_up(engine)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode_chat([ChatMessage(role="user", content=PROMPT)])
    greedy = SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0)
    params = ChatParams(messages=(ChatMessage(role="user", content=PROMPT),), sampling=greedy)

    def run(_: list[str]) -> dict[str, float]:
        started = time.perf_counter()
        times: list[float] = []
        for message in generate(engine, tokenizer, TaskId("bench"), params):
            if message.kind == "token":
                times.append(time.perf_counter())
        return _timed(started, times)

    def streams(args: list[str]) -> dict[str, float]:
        """Aggregate decode tokens/s of K greedy requests advanced together."""
        count = int(args[0])
        requests = [engine.new_request(len(prompt) + n + 1, seed=0) for _ in range(count)]
        tokens = [
            engine.read_token(
                engine.sample(engine.forward(engine.token_input(prompt), r), greedy, r)
            )
            for r in requests
        ]
        started = time.perf_counter()
        for _ in range(n - 1):
            x = torch.tensor([[t] for t in tokens])
            logits = engine.forward_batch(x, requests)
            tokens = engine.read_tokens(engine.sample_batch(logits, [greedy] * count, requests))
        elapsed = time.perf_counter() - started
        for r in requests:
            engine.release(r)
        return {"tps": count * (n - 1) / elapsed}

    def info(_: list[str]) -> dict[str, Any]:
        decoder = engine.decoder
        return {
            "load_s": load_s,
            "compiled": decoder is not None and not decoder.failed,
            "threads": torch.get_num_threads(),
            "prompt_tokens": len(prompt),
        }

    return {"run": run, "streams": streams, "info": info}


def mlx_lm_runner(model_dir: Path, n: int) -> dict[str, Callable[[list[str]], Any]]:
    import mlx.core as mx
    import mlx_lm  # pyright: ignore[reportMissingTypeStubs]
    from mlx_lm.generate import generate_step  # pyright: ignore[reportMissingTypeStubs]

    from exo.shared.types.chat import ChatMessage
    from exo.worker.engines.base import ChatTokenizer

    prompt = ChatTokenizer.from_dir(model_dir).encode_chat(
        [ChatMessage(role="user", content=PROMPT)]
    )
    loaded: Any = mlx_lm.load(str(model_dir))  # pyright: ignore[reportUnknownMemberType]
    model = loaded[0]

    def run(_: list[str]) -> dict[str, float]:
        started = time.perf_counter()
        times: list[float] = []
        steps: Any = generate_step(mx.array(prompt), model, max_tokens=n)
        for _ in steps:
            times.append(time.perf_counter())
        return _timed(started, times)

    return {"run": run}


def transformers_runner(model_dir: Path, n: int) -> dict[str, Callable[[list[str]], Any]]:
    from exo.models.builtin import builtin_gguf_path
    from exo.models.reference import HfGgufModel
    from exo.shared.types.chat import ChatMessage
    from exo.worker.engines.base import ChatTokenizer

    prompt = ChatTokenizer.from_dir(model_dir).encode_chat(
        [ChatMessage(role="user", content=PROMPT)]
    )
    model = HfGgufModel.load(builtin_gguf_path())

    def run(_: list[str]) -> dict[str, float]:
        started = time.perf_counter()
        model.greedy(prompt, 1)
        first = time.perf_counter()
        model.greedy(prompt, n)
        total = time.perf_counter() - first
        # The second call repeats the prefill: take it out of the decode time.
        return {"ttft_s": first - started, "decode_tps": (n - 1) / (total - (first - started))}

    return {"run": run}


def main() -> None:
    kind, model_dir, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    if kind in ("ours", "eager"):
        commands = ours(model_dir, n, compiled=kind == "ours")
    elif kind == "mlx_lm":
        commands = mlx_lm_runner(model_dir, n)
    elif kind == "transformers":
        commands = transformers_runner(model_dir, n)
    else:
        raise SystemExit(f"unknown engine {kind!r}")
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        print(json.dumps(commands[words[0]](words[1:])), flush=True)


if __name__ == "__main__":
    main()
