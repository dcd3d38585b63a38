"""The torch engine against raw mlx_lm, transformers and the memory-bandwidth roofline.

Same prompt, greedy, 128 new tokens; each engine is loaded once in a process of its own
(`bench/torch_worker.py`, as the daemon runs an engine in a runner process) and rounds
alternate between the engines so load from other processes hits all alike (medians
reported). Ours runs twice: with its compiled decode step (the default) and eagerly.
Also: 1/2/4/8 concurrent streams batched (aggregate tokens/s vs one stream), the load time
(compiling included), and resident memory of a loaded model vs its weights on disk.

    uv run python bench/bench_torch.py [MODEL_DIR] [--rounds 2] [--tokens 128]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

STREAMS = (1, 2, 4, 8)
ROOT = Path(__file__).resolve().parent.parent


class Worker:
    """One engine in its own process (`bench/torch_worker.py`)."""

    def __init__(self, kind: str, model_dir: Path, n: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.torch_worker", kind, str(model_dir), str(n)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        while (line := self._read()) != "READY":
            if not line:
                raise RuntimeError(f"the {kind} worker exited before it was ready")

    def _read(self) -> str:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        return stdout.readline().strip()

    def ask(self, command: str) -> dict[str, Any]:
        stdin: IO[str] | None = self.process.stdin
        assert stdin is not None
        stdin.write(command + "\n")
        stdin.flush()
        line = self._read()
        if not line:
            raise RuntimeError(f"the worker exited on {command!r}")
        return json.loads(line)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


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
    from exo.worker.engines.torch.compile_env import measure_compiled_steady_state

    measure_compiled_steady_state()

    rss = rss_of_loaded_model(model_dir)
    disk = weights_bytes(model_dir)
    names = {"torch (ours)": "ours", "torch eager (ours)": "eager"}
    if not args.skip_references:
        names |= {"mlx_lm": "mlx_lm", "transformers fp32": "transformers"}
    workers = {name: Worker(kind, model_dir, n) for name, kind in names.items()}
    ours = workers["torch (ours)"]
    info = ours.ask("info")
    results: dict[str, list[dict[str, float]]] = {name: [] for name in workers}
    streams: dict[int, list[float]] = {count: [] for count in STREAMS}
    bandwidths: list[float] = []
    try:
        for _ in range(args.rounds):
            bandwidths.append(bandwidth_gbps())
            for name, worker in workers.items():
                results[name].append(worker.ask("run"))
            for count in STREAMS:
                streams[count].append(ours.ask(f"streams {count}")["tps"])
    finally:
        for worker in workers.values():
            worker.close()

    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth * 1e9 / disk
    mine = statistics.median(r["decode_tps"] for r in results["torch (ours)"])
    print(
        f"threads {info['threads']}, prompt {info['prompt_tokens']} tokens, {n} new, greedy; "
        "each engine in its own process"
    )
    compiled = "yes" if info["compiled"] else "no"
    print(f"load {info['load_s']:.1f} s (compiled decode: {compiled}, included)")
    print(f"copy bandwidth {bandwidth:.1f} GB/s; weights {disk / 1e6:.1f} MB on disk")
    print(f"roofline {roofline:.0f} tokens/s (bandwidth / weight bytes)")
    for name, runs in results.items():
        tps = statistics.median(r["decode_tps"] for r in runs)
        ttft = statistics.median(r["ttft_s"] for r in runs) * 1000
        print(
            f"{name:>18}: decode {tps:6.1f} tokens/s  TTFT {ttft:6.0f} ms  "
            f"= {tps / roofline:.2f} x roofline, ours = {mine / tps:.1f} x this"
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
