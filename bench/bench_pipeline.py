"""A 2-stage pipeline on loopback against one stage, same model, same engine, greedy.

Real runner subprocesses linked by the activation stream (tests/pipeline_chain.py drives
them as the worker does). Measures, on one machine, in one run:

- decode tokens/s of one stream (128 tokens), 1 stage vs 2 stages, rounds alternating so
  that load from other processes hits both alike; medians and their ratio;
- the per-hop hand-off cost, two ways: derived from those rates (a 2-stage token takes two
  hops: the activation forward and the token back), and a loopback ping-pong of real
  frames through the real codec and sockets (`StageSender` / `StageListener`);
- aggregate tokens/s of the 2-stage pipeline with 1, 2, 4 and 8 concurrent streams;
- the placement cost model's predicted tokens/s for both, next to the measured ones.

    uv run python bench/bench_pipeline.py [--engine mlx] [--tokens 128] [--rounds 2]
        [--streams 1,2,4,8] [--stream-tokens 48] [--json out.json]
"""

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from exo.master.solver import place
from exo.models.cards import SMOLLM2_135M_INSTRUCT
from exo.models.store import ModelStore
from exo.shared.types.ids import NodeId
from exo.shared.types.instances import EngineName
from exo.shared.types.placement import ManualStage, Placement, PlacementRequest
from exo.shared.types.stream import StreamEnd, StreamError, TokenChunk
from exo.shared.types.topology import ClusterView, DeviceId, DeviceProfile, LinkProfile
from exo.worker.cores import cpu_cores, cpu_share
from exo.worker.cpu_features import cpu_flags, kernels_for
from exo.worker.engines.torch.compile_env import measure_compiled_steady_state
from exo.worker.pipeline.frames import FrameFlag, FrameKind, encode_array, encode_token
from exo.worker.pipeline.links import (
    LinkLost,
    Received,
    StageListener,
    StageSender,
    listen_socket,
)
from exo.worker.supervisor import cpu_sharing_env
from exo.worker.telemetry.profiler import cpu_bandwidth

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.pipeline_chain import Chain

MODEL = "smollm2-135m-instruct"
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


class Stream:
    def __init__(self) -> None:
        self.times: list[float] = []
        self.end: StreamEnd | StreamError | None = None

    @property
    def decode_tps(self) -> float:
        span = self.times[-1] - self.times[0] if len(self.times) > 1 else 0.0
        return (len(self.times) - 1) / span if span > 0 else 0.0


def run_streams(chain: Chain, n: int, tokens: int, tag: str) -> tuple[dict[str, Stream], float]:
    """n concurrent greedy requests; each stream's token arrival times and the wall time."""
    streams = {f"{tag}-{i}": Stream() for i in range(n)}
    started = time.perf_counter()
    for task in streams:
        chain.generate(task, PROMPT, tokens)
    done = 0
    last = chain.stages[-1]
    while done < n:
        # Tokens and ends come from the last stage: block on it (a driver polling every
        # millisecond would take CPU from the stages on a small machine), then look at the
        # others without waiting (an error may come from any stage).
        for stage in (last, *chain.stages[:-1]):
            try:
                message = (
                    stage.received.get(timeout=0.05)
                    if stage is last
                    else stage.received.get_nowait()
                )
            except queue.Empty:
                continue
            now = time.perf_counter()
            if message is None:
                raise RuntimeError(f"a stage exited:\n{chain.log_text()}")
            stream = streams.get(getattr(message, "task_id", ""))
            if stream is None:
                continue
            if isinstance(message, TokenChunk):
                stream.times.append(now)
            elif isinstance(message, StreamEnd | StreamError) and stream.end is None:
                stream.end = message
                done += 1
    wall = time.perf_counter() - started
    for task, stream in streams.items():
        if not isinstance(stream.end, StreamEnd):
            raise RuntimeError(f"{task} failed: {stream.end}")
    return streams, wall


def loopback_hop_ms(hidden: int, rounds: int = 2000) -> float:
    """Median one-way time of an activation frame [1, 1, hidden] float16 and of a token
    frame, each through encode -> TCP loopback -> decode (half a ping-pong)."""
    inbox: queue.Queue[Received | LinkLost] = queue.Queue()
    back: queue.Queue[Received | LinkLost] = queue.Queue()
    a = StageListener(listen_socket("127.0.0.1"), inbox.put)
    b = StageListener(listen_socket("127.0.0.1"), back.put)
    to_b = StageSender.connect("127.0.0.1", b.port, 5.0)
    to_a = StageSender.connect("127.0.0.1", a.port, 5.0)

    def echo() -> None:
        for _ in range(rounds):
            item = back.get()
            assert isinstance(item, Received)
            to_a.send(encode_token(item.frame.request_id, 0, 1, final=False))

    threading.Thread(target=echo, daemon=True).start()
    x = np.zeros((1, 1, hidden), dtype=np.float16)
    samples: list[float] = []
    for _ in range(rounds):
        t = time.perf_counter()
        to_b.send(encode_array(FrameKind.ACTIVATION, "bench", 0, FrameFlag.SAMPLE, x))
        item = inbox.get()
        samples.append(time.perf_counter() - t)
        assert isinstance(item, Received)
    for closer in (to_a, to_b, a, b):
        closer.close()
    return statistics.median(samples) / 2 * 1000


def _pingpong(
    role: str,
    engine: EngineName,
    model_dir: Path,
    fd: int | None,
    steps: int,
    rounds: int,
    env: dict[str, str],
    share: set[int] | None,
) -> "subprocess.Popen[str]":
    """bench/stage_pingpong.py in a process of its own, on `share` (all CPUs when None)."""

    def pin() -> None:
        if share is not None:
            os.sched_setaffinity(0, share)

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.stage_pingpong",
            role,
            engine,
            str(model_dir),
            "-" if fd is None else str(fd),
            str(steps),
            str(rounds),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        pass_fds=() if fd is None else (fd,),
        preexec_fn=pin,
        cwd=Path(__file__).resolve().parents[1],
    )


def _rounds(procs: "list[subprocess.Popen[str]]", rounds: int) -> list[float]:
    """Start the loaded pingpong processes together; the first one's steps/s per round."""
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "READY":
                raise RuntimeError("a bare stage failed to load")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        first = procs[0].stdout
        assert first is not None
        return [float(json.loads(first.readline())["steps_per_s"]) for _ in range(rounds)]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def bare_alternation(
    engine: EngineName,
    model_dir: Path,
    cpus: list[set[int]] | None,
    env: dict[str, str],
    steps: int,
    rounds: int,
) -> list[float]:
    """Steps/s of the split's two bare engine stages taking turns (bench/stage_pingpong.py),
    on the CPUs and with the environment the pipeline's stages get."""
    ours, theirs = socket.socketpair()
    try:
        procs = [
            _pingpong(
                role,
                engine,
                model_dir,
                end.fileno(),
                steps,
                rounds,
                env,
                None if cpus is None else cpus[i],
            )
            for i, (role, end) in enumerate((("first", ours), ("last", theirs)))
        ]
        return _rounds(procs, rounds)
    finally:
        ours.close()
        theirs.close()


def one_process_alternation(
    engine: EngineName, model_dir: Path, cpus: set[int] | None, steps: int, rounds: int
) -> list[float]:
    """Steps/s of the same two bare stages taking turns on one thread of one process, on
    the single stage's CPUs: the split without a second process (and its threads)."""
    return _rounds([_pingpong("both", engine, model_dir, None, steps, rounds, {}, cpus)], rounds)


def predicted_tps(engine: EngineName, bandwidth: float, hop_s: float) -> tuple[float, float]:
    """The placement cost model's decode tokens/s for 1 stage and for the 2-stage split,
    on two devices like this CPU joined by a link with the measured loopback hop."""
    card = SMOLLM2_135M_INSTRUCT

    def cpu(node: str) -> DeviceProfile:
        return DeviceProfile(
            device_id=DeviceId(f"{node}/cpu"),
            node_id=NodeId(node),
            name="this CPU",
            kind="cpu",
            memory_free_bytes=8 << 30,
            memory_bandwidth_bytes_per_s=bandwidth,
            compute_flops=1e11,
            cpu_kernels=kernels_for(cpu_flags()),
        )

    link = LinkProfile(src=NodeId("a"), dst=NodeId("b"), latency_s=hop_s, bandwidth_bytes_per_s=1e9)
    view = ClusterView(devices=(cpu("a"), cpu("b")), links=(link,))
    figures: list[float] = []
    for split in ((("a", 0, 30),), (("a", 0, 15), ("b", 15, 30))):
        request = PlacementRequest(
            engine=engine,
            manual_split=tuple(
                ManualStage(device_id=DeviceId(f"{n}/cpu"), start_layer=a, end_layer=b)
                for n, a, b in split
            ),
        )
        placed = place(card, view, request)
        assert isinstance(placed, Placement), placed
        figures.append(placed.prediction.tokens_per_s)
    return figures[0], figures[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--engine", choices=["mlx", "torch"], default="mlx")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", default="1,2,4,8")
    parser.add_argument("--stream-tokens", type=int, default=48)
    parser.add_argument(
        "--layout",
        choices=["split", "pinned", "shared", "nodes"],
        default="split",
        help="split: what the worker does with two stages of an instance on one node (MLX: "
        "each stage on its own half of the cores; torch: both on every core, each stepping "
        "with all of them while the other has nothing to do and with its half otherwise); "
        "pinned: each stage on its own half, whatever the engine; shared: both stages on "
        "every core, their threads sleeping when idle (the worker's fallback with fewer cores "
        "than stages); nodes: each stage on its own half and the single stage on one half "
        "too, as if each half were a node of its own",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    engine: EngineName = args.engine
    measure_compiled_steady_state()
    model_dir = ModelStore(Path.home() / ".cache" / "exo" / "models").ensure(MODEL)
    logs = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    result: dict[str, Any] = {"engine": engine, "tokens": args.tokens}

    hop_ms = loopback_hop_ms(576)
    result["loopback_hop_ms"] = hop_ms
    print(f"loopback frame hop (codec + TCP, [1,1,576] f16): {hop_ms:.3f} ms one-way")

    for sub in ("single", "two"):
        (logs / sub).mkdir()
    layout: str = args.layout
    result["layout"] = layout
    cpus = sorted(os.sched_getaffinity(0))
    # The worker's split: whole physical cores for each stage.
    shares = [cpu_share(cpu_cores(), slot, 2) for slot in range(2)]
    halves = [share for share in shares if share is not None]
    if layout != "shared" and len(halves) < 2:
        raise SystemExit(f"--layout {layout} needs two physical cores at least")
    single_cpus = [halves[0]] if layout == "nodes" else None
    single = Chain(model_dir, [(engine, 0, 30)], logs / "single", cpus=single_cpus)
    two_env: dict[str, str] = {}
    two_cpus: list[set[int]] | None = halves
    if layout == "shared":
        # Both stages on every core, with the environment the worker gives such stages.
        two_env = cpu_sharing_env(0, 2, cores={0: (0, 0)})  # no core each: they share
        two_cpus = None
    elif layout == "split" and engine == "torch":
        # Each stage's environment from the worker (the same for both of two stages).
        two_env = cpu_sharing_env(0, 2, engine=engine)
        two_cpus = None
    stages: list[tuple[EngineName, int, int]] = [(engine, 0, 15), (engine, 15, 30)]
    two = Chain(model_dir, stages, logs / "two", env=two_env, cpus=two_cpus)
    print(f"layout {layout}: CPUs {cpus}" + (f", stages on {two_cpus}" if two_cpus else ""))
    try:
        # The floor under any hand-off: the same two stages, bare, taking turns.
        bare = bare_alternation(engine, model_dir, two_cpus, two_env, args.tokens, args.rounds)
        result["bare_alternation_steps_per_s"] = bare
        print(f"bare stages taking turns: {statistics.median(bare):.2f} steps/s ({bare})")
        # The same two stages in one process: what the second process costs.
        together = one_process_alternation(
            engine,
            model_dir,
            None if single_cpus is None else single_cpus[0],
            args.tokens,
            args.rounds,
        )
        result["one_process_alternation_steps_per_s"] = together
        print(
            f"the same stages taking turns in one process: "
            f"{statistics.median(together):.2f} steps/s ({together})"
        )
        rates: dict[str, list[float]] = {"1-stage": [], "2-stage": []}
        for r in range(args.rounds):
            for name, chain in (("1-stage", single), ("2-stage", two)):
                streams, _ = run_streams(chain, 1, args.tokens, f"{name}-r{r}")
                (stream,) = streams.values()
                rates[name].append(stream.decode_tps)
                print(f"round {r} {name}: {stream.decode_tps:.2f} tokens/s decode")
        one_tps = statistics.median(rates["1-stage"])
        two_tps = statistics.median(rates["2-stage"])
        per_hop_ms = (1 / two_tps - 1 / one_tps) / 2 * 1000
        bare_tps = statistics.median(bare)
        together_tps = statistics.median(together)
        result |= {
            "one_process_alternation_over_1_stage": together_tps / one_tps,
            "bare_alternation_over_one_process": bare_tps / together_tps,
            "pipeline_over_bare_alternation": two_tps / bare_tps,
            "hand_off_ms_per_hop_over_bare": (1 / two_tps - 1 / bare_tps) / 2 * 1000,
            "decode_tps_1_stage": rates["1-stage"],
            "decode_tps_2_stage": rates["2-stage"],
            "ratio_2_over_1": two_tps / one_tps,
            "derived_per_hop_ms": per_hop_ms,
        }
        print(
            f"decode: 1 stage {one_tps:.2f}, 2 stages {two_tps:.2f} tokens/s, "
            f"ratio {two_tps / one_tps:.3f}; derived cost per hop {per_hop_ms:.2f} ms"
        )
        print(
            f"the pipeline against its bare stages taking turns: "
            f"{two_tps / bare_tps:.3f} (so the hand-off, stage loop and runner cost "
            f"{result['hand_off_ms_per_hop_over_bare']:.3f} ms per hop; the rest of the "
            f"1 -> 2 stage loss is the split itself on this machine: {bare_tps / one_tps:.3f})"
        )
        print(
            f"of that split: the two stages in one process against one stage "
            f"{together_tps / one_tps:.3f}, two processes against one {bare_tps / together_tps:.3f}"
        )
        bandwidth, _detail = cpu_bandwidth()
        p1, p2 = predicted_tps(engine, bandwidth, hop_ms / 1000)
        result |= {"predicted_tps_1_stage": p1, "predicted_tps_2_stage": p2}
        print(
            f"placement cost model (CPU bandwidth {bandwidth / 1e9:.1f} GB/s): predicted "
            f"1 stage {p1:.2f} (measured {one_tps:.2f}), 2 stages {p2:.2f} "
            f"(measured {two_tps:.2f}) tokens/s"
        )
        single.close()
        counts = [int(s) for s in args.streams.split(",")]
        runs: dict[int, list[float]] = {n: [] for n in counts}
        for r in range(args.rounds):
            # Alternating order: a load spike from other processes hits every count alike.
            for n in counts if r % 2 == 0 else counts[::-1]:
                streams, wall = run_streams(two, n, args.stream_tokens, f"c{n}-r{r}")
                total = sum(len(s.times) for s in streams.values())
                runs[n].append(total / wall)
                print(
                    f"round {r}, {n} streams: {total} tokens in {wall:.1f} s = {total / wall:.2f}/s"
                )
        aggregate = {n: statistics.median(v) for n, v in runs.items()}
        result["aggregate_tps"] = aggregate
        result["aggregate_runs"] = runs
        base = aggregate.get(1)
        if base:
            for n, tps in aggregate.items():
                print(f"  median {tps:.2f} tokens/s = x{tps / base:.2f} of 1 stream at {n} streams")
    finally:
        single.close()
        two.close()
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
