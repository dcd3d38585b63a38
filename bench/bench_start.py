"""From starting a node to its first token, against raw mlx_lm's cold start, same run.

The built-in model, the run command's daemon (torch engine, compiled decode step as the
run command has it), a fresh home whose caches the first start fills (inductor's graphs,
our kernels, and, from its background saver, the saved decode steps: the first start
waits for it), then restarts that find them warm: the common case. Restarts that load the
saved steps alternate with restarts that compile them ($EXO_TORCH_SAVED_GRAPHS=0, as
before saved steps existed) and with the reference: a fresh Python process that imports
mlx_lm, loads the same converted directory and streams one token. Also prints the daemon's
and the runner's resident memory after the first token, and when every bucket's step was
ready. Record the results in docs/benchmarks.md.

    uv run python bench/bench_start.py [--restarts N]
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.daemon import Daemon

from exo.worker.engines.torch.compile_env import SAVED_GRAPHS_ENV
from exo.worker.engines.torch.compiled import BUCKETS

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


@dataclass
class Start:
    healthz: float
    token: float
    daemon_mb: float
    runner_mb: float
    # From the spawn until the runner had every bucket's decode step.
    every_bucket: float = float("nan")


def _graphs(home: Path) -> int:
    return len(list(home.rglob("exo_graphs/*.graph")))


def _log(home: Path) -> Path:
    return home / "cache" / "logs" / "exo.jsonl"


def _every_bucket_ready(home: Path, since: int, spawned: float) -> float:
    """Seconds from the spawn until the runner logged the last bucket's step (compiled or
    loaded); waits for it."""
    pattern = re.compile(r"(compiled the|loaded the saved) decode step of batches of (\d+)")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        with _log(home).open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        if {int(m.group(2)) for m in pattern.finditer(text)} >= set(BUCKETS[1:]):
            return time.perf_counter() - spawned
        time.sleep(0.2)
    return float("nan")


def node_start(home: Path, models: Path, saved: str, wait_for_saver: bool = False) -> Start:
    """One start of the node, stopped after its first token ($EXO_TORCH_SAVED_GRAPHS=saved);
    `wait_for_saver`: stopped only once the saver saved every bucket's step."""
    os.environ[SAVED_GRAPHS_ENV] = saved
    start = time.perf_counter()
    daemon = Daemon(home, models, "--model", MODEL, compiled=True)
    since = _log(home).stat().st_size if _log(home).exists() else 0
    daemon.start(timeout_s=300)
    try:
        healthz = time.perf_counter() - start
        first_token(daemon.url)
        token = time.perf_counter() - start
        assert daemon.process is not None
        runners = daemon.runner_pids()
        result = Start(healthz, token, rss_mb(daemon.process.pid), sum(rss_mb(p) for p in runners))
        result.every_bucket = _every_bucket_ready(home, since, start)
        if wait_for_saver:
            deadline = time.monotonic() + 1800
            while _graphs(home) < len(BUCKETS) and time.monotonic() < deadline:
                time.sleep(1)
            print(
                f"the saver saved {_graphs(home)} steps {time.perf_counter() - start:.0f} s after the spawn"
            )
        return result
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
        cold = node_start(home, models, "1", wait_for_saver=True)
        runs: dict[str, list[Start]] = {"saved": [], "compiled": []}
        reference: list[float] = []
        for _ in range(args.restarts):  # interleaved, so background load hits all alike
            runs["saved"].append(node_start(home, models, "load"))
            runs["compiled"].append(node_start(home, models, "0"))
            reference.append(reference_start(model_dir))

    ref = statistics.median(reference)
    print(
        f"first start, cold caches: /healthz {cold.healthz:.1f} s, first token {cold.token:.1f} s,"
        f" every bucket {cold.every_bucket:.1f} s"
    )
    for name, starts in runs.items():
        token = statistics.median(o.token for o in starts)
        print(
            f"restarts with decode steps {name} ({args.restarts}), medians: /healthz"
            f" {statistics.median(o.healthz for o in starts):.1f} s, first token {token:.1f} s,"
            f" every bucket {statistics.median(o.every_bucket for o in starts):.1f} s"
        )
        print("  first token each:", ", ".join(f"{o.token:.1f}" for o in starts), "s")
        print(f"  ratio (exo restart / raw mlx_lm) {token / ref:.2f}")
        print(
            f"  resident memory after the first token: daemon"
            f" {statistics.median(o.daemon_mb for o in starts):.0f} MB, runner"
            f" {statistics.median(o.runner_mb for o in starts):.0f} MB"
        )
    print(f"raw mlx_lm, fresh process to first token: {ref:.1f} s")
    print("  each:", ", ".join(f"{r:.1f}" for r in reference), "s")


if __name__ == "__main__":
    main()
