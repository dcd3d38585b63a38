"""Decode tokens/s and time to first token through our API vs raw mlx_lm, same run.

Greedy, 128 new tokens, the built-in model converted into a fresh store. Also measures the
idle CPU of a daemon with the model loaded. Prints ratios; record them in docs/benchmarks.md.

    uv run python bench/bench_api.py [mlx|torch]   # the daemon's engine (default mlx)
"""

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon import Daemon

from exo.worker.engines.torch.compile_env import measure_compiled_steady_state

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle."
NEW_TOKENS = 128
RUNS = 3


def api_run(daemon: Daemon) -> tuple[float, float, int, float]:
    """(ttft s, decode tokens/s, completion tokens, runner-side ttft s) for a streaming client."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    runner_ttft = 0.0
    with httpx.stream("POST", f"{daemon.url}/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                runner_ttft = chunk["timings"]["time_to_first_token_ms"] / 1000
            if (
                chunk.get("choices")
                and first is None
                and chunk["choices"][0]["delta"].get("content")
            ):
                first = time.perf_counter()
    end = time.perf_counter()
    assert first is not None and tokens > 1
    return first - start, (tokens - 1) / (end - first), tokens, runner_ttft


class MlxLmReference:
    """mlx_lm's own loop on the same converted directory, loaded once."""

    def __init__(self, model_dir: Path) -> None:
        import mlx_lm  # pyright: ignore[reportMissingTypeStubs]
        from mlx_lm.sample_utils import make_sampler  # pyright: ignore[reportMissingTypeStubs]

        loaded: Any = mlx_lm.load(str(model_dir))  # pyright: ignore[reportUnknownMemberType]
        self._mlx_lm: Any = mlx_lm
        self._model: Any = loaded[0]
        self._tokenizer: Any = loaded[1]
        self._sampler: Any = make_sampler(temp=0.0)
        self._prompt: Any = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True
        )

    def run(self, n_tokens: int) -> tuple[float, float]:
        """(ttft seconds, decode tokens/s), greedy."""
        start = time.perf_counter()
        first: float | None = None
        count = 0
        for _ in self._mlx_lm.stream_generate(
            self._model, self._tokenizer, self._prompt, max_tokens=n_tokens, sampler=self._sampler
        ):
            count += 1
            if first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        return first - start, (count - 1) / (end - first)


def idle_cpu_percent(daemon: Daemon, seconds: float = 10.0) -> float:
    assert daemon.process is not None
    root = psutil.Process(daemon.process.pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        p.cpu_percent(None)
    time.sleep(seconds)
    return sum(p.cpu_percent(None) for p in procs if p.is_running())


def main() -> None:
    from exo.models.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        model_dir = ModelStore(models).ensure(MODEL)
        reference = MlxLmReference(model_dir)
        # The MLX engine on both sides, so the ratio isolates what our daemon and API add.
        engine = sys.argv[1] if len(sys.argv) > 1 else "mlx"
        measure_compiled_steady_state()
        daemon = Daemon(Path(tmp) / "node", models, "--engine", engine, compiled=True).start()
        try:
            daemon.wait_ready(MODEL)
            n_tokens = api_run(daemon)[2]  # warm-up; the reference makes as many tokens
            reference.run(8)
            api: list[tuple[float, float, int, float]] = []
            ref: list[tuple[float, float]] = []
            for _ in range(RUNS):  # interleaved, so background load hits both alike
                api.append(api_run(daemon))
                ref.append(reference.run(n_tokens))
            idle = idle_cpu_percent(daemon)
        finally:
            daemon.stop()

    api_ttft = statistics.median(a[0] for a in api)
    api_tps = statistics.median(a[1] for a in api)
    ref_ttft = statistics.median(r[0] for r in ref)
    ref_tps = statistics.median(r[1] for r in ref)
    print(f"completion tokens per run       {n_tokens}")
    print(f"raw mlx_lm   decode tok/s {ref_tps:8.2f}   ttft {ref_ttft * 1000:8.1f} ms")
    print(f"exo API      decode tok/s {api_tps:8.2f}   ttft {api_ttft * 1000:8.1f} ms")
    print(f"ratio decode (exo / mlx_lm)     {api_tps / ref_tps:.3f}   (target >= 0.95)")
    print(
        f"added ttft (exo - mlx_lm)       {(api_ttft - ref_ttft) * 1000:+.1f} ms   (target <= 50)"
    )
    overhead = statistics.median(a[0] - a[3] for a in api)
    print(
        f"daemon + API share of exo ttft  {overhead * 1000:+.1f} ms   (client ttft - runner ttft)"
    )
    print(f"idle daemon CPU, model loaded   {idle:.2f} % of one core   (target < 2)")


if __name__ == "__main__":
    main()
