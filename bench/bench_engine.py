"""Our mlx engine against raw mlx_lm on the same converted model directory, same process.

Greedy, fixed chat prompt, 128 new tokens. Rounds alternate between the two so that load
from other processes hits both alike; medians are reported.

    uv run python bench/bench_engine.py MODEL_DIR [--rounds 3] [--tokens 128]
"""

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from exo.shared.types.chat import ChatMessage, ChatParams, SamplingParams
from exo.shared.types.ids import TaskId
from exo.worker.engines.base import ChatTokenizer, ShardSpec, load_engine, warm_up
from exo.worker.generate import generate

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


class Run:
    def __init__(self, ttft_s: float, token_times: list[float], token_ids: list[int]) -> None:
        self.ttft_s = ttft_s
        self.token_ids = token_ids
        # Decode rate over the tokens after the first, as both sides measure it here.
        span = token_times[-1] - token_times[0]
        self.decode_tps = (len(token_times) - 1) / span if span > 0 else 0.0


def run_ours(model_dir: Path, params: ChatParams) -> Callable[[], Run]:
    engine = load_engine(
        "mlx", model_dir, ShardSpec(0, _n_layers(model_dir), _n_layers(model_dir)), _ignore
    )
    tokenizer = ChatTokenizer.from_dir(model_dir)
    warm_up(engine)

    def once() -> Run:
        started = time.perf_counter()
        times: list[float] = []
        ids: list[int] = []
        for message in generate(engine, tokenizer, TaskId("bench"), params):
            if message.kind == "token":
                times.append(time.perf_counter())
                ids.append(message.token_id)
        return Run(times[0] - started, times, ids)

    return once


def run_mlx_lm(model_dir: Path, params: ChatParams) -> Callable[[], Run]:
    import mlx.core as mx
    import mlx_lm  # pyright: ignore[reportMissingTypeStubs]
    from mlx_lm.generate import generate_step  # pyright: ignore[reportMissingTypeStubs]

    loaded: Any = mlx_lm.load(str(model_dir))  # pyright: ignore[reportUnknownMemberType]
    model, hf_tokenizer = loaded[0], loaded[1]
    messages = [{"role": m.role, "content": m.content} for m in params.messages]
    max_tokens = params.sampling.max_tokens

    def once() -> Run:
        started = time.perf_counter()
        prompt: list[int] = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        times: list[float] = []
        ids: list[int] = []
        steps: Iterator[tuple[Any, Any]] = generate_step(
            mx.array(prompt), model, max_tokens=max_tokens
        )
        for token, _ in steps:
            times.append(time.perf_counter())
            ids.append(int(token))
        return Run(times[0] - started, times, ids)

    once()  # warm up, as ours is
    return once


def _ignore(_: float) -> None:
    pass


def _n_layers(model_dir: Path) -> int:
    import json

    return int(json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()
    model_dir: Path = args.model_dir
    params = ChatParams(
        messages=(ChatMessage(role="user", content=PROMPT),),
        sampling=SamplingParams(max_tokens=args.tokens, temperature=0.0, top_p=1.0),
    )
    ours_once, theirs_once = run_ours(model_dir, params), run_mlx_lm(model_dir, params)
    ours: list[Run] = []
    theirs: list[Run] = []
    for i in range(args.rounds):
        ours.append(ours_once())
        theirs.append(theirs_once())
        print(
            f"round {i + 1}: ours {ours[-1].decode_tps:.2f} tok/s ttft {ours[-1].ttft_s * 1000:.0f} ms"
            f" | mlx_lm {theirs[-1].decode_tps:.2f} tok/s ttft {theirs[-1].ttft_s * 1000:.0f} ms"
        )
    same = ours[0].token_ids == theirs[0].token_ids[: len(ours[0].token_ids)]
    o_tps = statistics.median(r.decode_tps for r in ours)
    t_tps = statistics.median(r.decode_tps for r in theirs)
    o_ttft = statistics.median(r.ttft_s for r in ours) * 1000
    t_ttft = statistics.median(r.ttft_s for r in theirs) * 1000
    print(f"tokens: ours {len(ours[0].token_ids)}, mlx_lm {len(theirs[0].token_ids)}, same: {same}")
    print(f"decode tokens/s  ours {o_tps:.2f}  mlx_lm {t_tps:.2f}  ratio {o_tps / t_tps:.3f}")
    print(f"ttft ms          ours {o_ttft:.0f}  mlx_lm {t_ttft:.0f}  added {o_ttft - t_ttft:+.0f}")


if __name__ == "__main__":
    main()
