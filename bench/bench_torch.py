"""The torch engine against raw mlx_lm, transformers and the memory-bandwidth roofline.

One process, same prompt, greedy, 128 new tokens; rounds alternate between the engines so
load from other processes hits all alike (medians reported). Ours runs twice: with its
compiled decode step (the default) and eagerly. Also: 1/2/4/8 concurrent streams batched
(aggregate tokens/s vs one stream), the load time (compiling included), and resident
memory of a loaded model vs its weights on disk (measured in a fresh subprocess).

    uv run python bench/bench_torch.py [MODEL_DIR] [--rounds 2] [--tokens 128]
"""

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.worker.engines.base import ChatTokenizer, ShardSpec, warm_up
from exo.worker.engines.torch.engine import TorchEngine
from exo.worker.generate import generate

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
STREAMS = (1, 2, 4, 8)


class Run:
    def __init__(self, ttft_s: float, decode_tps: float) -> None:
        self.ttft_s = ttft_s
        self.decode_tps = decode_tps


def bandwidth_gbps() -> float:
    """Sustained copy bandwidth (bytes read + written) over a buffer far larger than L3."""
    src = np.ones(64 * 2**20, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return 2 * src.nbytes / best / 1e9


def weights_bytes(model_dir: Path) -> int:
    return sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))


def run_ours(
    engine: TorchEngine, tokenizer: ChatTokenizer, n: int, compiled: bool
) -> Callable[[], Run]:
    decoder = engine.decoder
    params = ChatParams(
        messages=(ChatMessage(role="user", content=PROMPT),),
        sampling=SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0),
    )

    def once() -> Run:
        engine.decoder = decoder if compiled else None
        started = time.perf_counter()
        times: list[float] = []
        for message in generate(engine, tokenizer, TaskId("bench"), params):
            if message.kind == "token":
                times.append(time.perf_counter())
        engine.decoder = decoder
        return Run(times[0] - started, (len(times) - 1) / (times[-1] - times[0]))

    return once


def run_streams(engine: TorchEngine, prompt: list[int], n: int, streams: int) -> float:
    """Aggregate decode tokens/s of `streams` greedy requests advanced together."""
    greedy = SamplingParams(max_tokens=n, temperature=0.0, top_p=1.0)
    requests = [engine.new_request(len(prompt) + n + 1, seed=0) for _ in range(streams)]
    tokens = [
        engine.read_token(engine.sample(engine.forward(engine.token_input(prompt), r), greedy, r))
        for r in requests
    ]
    started = time.perf_counter()
    for _ in range(n - 1):
        x = torch.tensor([[t] for t in tokens])
        logits = engine.forward_batch(x, requests)
        tokens = engine.read_tokens(engine.sample_batch(logits, [greedy] * streams, requests))
    return streams * (n - 1) / (time.perf_counter() - started)


def run_mlx_lm(model_dir: Path, prompt: list[int], n: int) -> Callable[[], Run]:
    import mlx.core as mx
    import mlx_lm  # pyright: ignore[reportMissingTypeStubs]
    from mlx_lm.generate import generate_step  # pyright: ignore[reportMissingTypeStubs]

    loaded: Any = mlx_lm.load(str(model_dir))  # pyright: ignore[reportUnknownMemberType]
    model = loaded[0]

    def once() -> Run:
        started = time.perf_counter()
        times: list[float] = []
        steps: Any = generate_step(mx.array(prompt), model, max_tokens=n)
        for _ in steps:
            times.append(time.perf_counter())
        return Run(times[0] - started, (len(times) - 1) / (times[-1] - times[0]))

    return once


def run_transformers(prompt: list[int], n: int) -> Callable[[], Run]:
    from exo.models.builtin import builtin_gguf_path
    from exo.models.reference import HfGgufModel

    model = HfGgufModel.load(builtin_gguf_path())

    def once() -> Run:
        started = time.perf_counter()
        model.greedy(prompt, 1)
        first = time.perf_counter()
        model.greedy(prompt, n)
        total = time.perf_counter() - first
        # The second call repeats the prefill: take it out of the decode time.
        return Run(first - started, (n - 1) / (total - (first - started)))

    return once


def rss_of_loaded_model(model_dir: Path) -> dict[str, float]:
    """In a fresh process: resident memory added by the first loaded model (torch's own
    start-up included) and by a second copy (what one more model costs)."""
    code = (
        "import json, sys, gc, psutil\n"
        "from pathlib import Path\n"
        "from exo.worker.engines.base import ShardSpec, warm_up\n"
        "from exo.worker.engines.torch.engine import TorchEngine\n"
        "p = psutil.Process()\n"
        "rss = [p.memory_info().rss]\n"
        "engines = []\n"
        "for _ in range(2):\n"
        "    engines.append(TorchEngine.load(Path(sys.argv[1]), ShardSpec(0, 30, 30), print))\n"
        "    warm_up(engines[-1]); gc.collect(); rss.append(p.memory_info().rss)\n"
        "print(json.dumps({'first': rss[1] - rss[0], 'second': rss[2] - rss[1], 'total': rss[2]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(model_dir)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path, nargs="?")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--skip-references", action="store_true")
    args = parser.parse_args()
    model_dir: Path | None = args.model_dir
    if model_dir is None:
        from exo.models.store import ModelStore

        model_dir = ModelStore(Path.home() / ".cache" / "exo" / "models").ensure(
            "smollm2-135m-instruct"
        )
    n: int = args.tokens

    rss = rss_of_loaded_model(model_dir)
    disk = weights_bytes(model_dir)
    started = time.perf_counter()
    engine = TorchEngine.load(model_dir, ShardSpec(0, 30, 30), lambda _: None)
    load_s = time.perf_counter() - started
    warm_up(engine)
    tokenizer = ChatTokenizer.from_dir(model_dir)
    prompt = tokenizer.encode_chat([ChatMessage(role="user", content=PROMPT)])
    runners: dict[str, Callable[[], Run]] = {
        "torch (ours)": run_ours(engine, tokenizer, n, compiled=True),
        "torch eager (ours)": run_ours(engine, tokenizer, n, compiled=False),
    }
    if not args.skip_references:
        runners["mlx_lm"] = run_mlx_lm(model_dir, prompt, n)
        runners["transformers fp32"] = run_transformers(prompt, n)
    results: dict[str, list[Run]] = {name: [] for name in runners}
    streams: dict[int, list[float]] = {count: [] for count in STREAMS}
    bandwidths: list[float] = []
    for _ in range(args.rounds):
        bandwidths.append(bandwidth_gbps())
        for name, once in runners.items():
            gc.collect()
            results[name].append(once())
        for count in STREAMS:
            streams[count].append(run_streams(engine, prompt, n, count))

    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth * 1e9 / disk
    ours = statistics.median(r.decode_tps for r in results["torch (ours)"])
    print(f"threads {torch.get_num_threads()}, prompt {len(prompt)} tokens, {n} new, greedy")
    compiled = engine.decoder is not None and not engine.decoder.failed
    print(f"load {load_s:.1f} s (compiled decode: {'yes' if compiled else 'no'}, included)")
    print(f"copy bandwidth {bandwidth:.1f} GB/s; weights {disk / 1e6:.1f} MB on disk")
    print(f"roofline {roofline:.0f} tokens/s (bandwidth / weight bytes)")
    for name, runs in results.items():
        tps = statistics.median(r.decode_tps for r in runs)
        ttft = statistics.median(r.ttft_s for r in runs) * 1000
        print(
            f"{name:>18}: decode {tps:6.1f} tokens/s  TTFT {ttft:6.0f} ms  "
            f"= {tps / roofline:.2f} x roofline, ours = {ours / tps:.1f} x this"
        )
    one = statistics.median(streams[1])
    for count, rates in streams.items():
        many = statistics.median(rates)
        print(f"{count} streams: {many:6.1f} tokens/s aggregate = {many / one:.2f} x one stream")
    print(
        f"RSS per loaded model {rss['second'] / 1e6:.1f} MB = {rss['second'] / disk:.2f} x "
        f"weights on disk ({disk / 1e6:.1f} MB); the first load adds {rss['first'] / 1e6:.0f} MB "
        f"(torch's own start-up included)"
    )


if __name__ == "__main__":
    main()
