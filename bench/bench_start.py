"""From starting a node to its first token, against raw mlx_lm's cold start, same run.

The built-in model, the run command's daemon (torch engine, compiled decode step as the
run command has it), a fresh home whose caches the first start fills (inductor's graphs,
our kernels), then restarts that find them warm: the common case. The reference is a fresh
Python process that imports mlx_lm, loads the same converted directory and streams one
token. Also prints the daemon's and the runner's resident memory after the first token.
Record the results in docs/benchmarks.md.

    uv run python bench/bench_start.py [--restarts N]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon import Daemon

MODEL = "smollm2-135m-instruct"
PROMPT = "Name three colours."

_REFERENCE = """
import sys
from mlx_lm import load, stream_generate
model, tokenizer = load(sys.argv[1])
prompt = tokenizer.apply_chat_template(
    [{"role": "user", "content": sys.argv[2]}], add_generation_prompt=True
)
for _ in stream_generate(model, tokenizer, prompt, max_tokens=1):
    break
"""


def reference_start(model_dir: Path) -> float:
    """Seconds from spawning a Python process to raw mlx_lm's first token."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", _REFERENCE, str(model_dir), PROMPT], check=True)
    return time.perf_counter() - start


def first_token(url: str) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0.0,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                return
    raise RuntimeError("the stream ended without a token")


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


def node_start(home: Path, models: Path) -> tuple[float, float, float, float]:
    """(s to /healthz, s to the first token, daemon RSS MB, runner RSS MB), from the spawn."""
    start = time.perf_counter()
    daemon = Daemon(home, models, "--model", MODEL, compiled=True).start(timeout_s=300)
    try:
        healthz = time.perf_counter() - start
        first_token(daemon.url)
        token = time.perf_counter() - start
        assert daemon.process is not None
        runners = daemon.runner_pids()
        return healthz, token, rss_mb(daemon.process.pid), sum(rss_mb(p) for p in runners)
    finally:
        daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--restarts", type=int, default=3)
    args = parser.parse_args()
    from exo.models.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        model_dir = ModelStore(models).ensure(MODEL)
        home = Path(tmp) / "node"
        cold = node_start(home, models)
        ours: list[tuple[float, float, float, float]] = []
        reference: list[float] = []
        for _ in range(args.restarts):  # interleaved, so background load hits both alike
            ours.append(node_start(home, models))
            reference.append(reference_start(model_dir))

    healthz = statistics.median(o[0] for o in ours)
    token = statistics.median(o[1] for o in ours)
    ref = statistics.median(reference)
    print(f"first start, cold caches: /healthz {cold[0]:.1f} s, first token {cold[1]:.1f} s")
    print(
        f"restarts ({args.restarts}), medians: /healthz {healthz:.1f} s, first token {token:.1f} s"
    )
    print("  each:", ", ".join(f"{o[1]:.1f}" for o in ours), "s")
    print(f"raw mlx_lm, fresh process to first token: {ref:.1f} s")
    print("  each:", ", ".join(f"{r:.1f}" for r in reference), "s")
    print(f"ratio (exo restart / raw mlx_lm)          {token / ref:.2f}")
    print(
        f"resident memory after the first token: daemon {statistics.median(o[2] for o in ours):.0f}"
        f" MB, runner {statistics.median(o[3] for o in ours):.0f} MB"
    )


if __name__ == "__main__":
    main()
