"""A prototype int4 x int8 AVX512-VNNI matmul against torch's int4 CPU kernel.

Not wired into the engine: this measures whether writing our own kernel pays, at the
built-in model's shapes (every matmul of one decode step, 30 layers and the head), for 1, 2
and 4 rows, on 2 threads and on 1, with the error of each against float32 on dequantized
weights. The kernel (`bench/kernels/vnni_int4.cpp`) quantizes activations per 32 inputs to
int8, like llama.cpp's Q4_1 x Q8_1; torch's kernel runs bf16 activations.

    uv run python bench/bench_vnni_kernel.py
"""

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.cpp_extension import load  # pyright: ignore[reportUnknownVariableType]

# (out, in) of each matmul of one layer, and of the head; how many of each a step runs.
SHAPES = {
    "qkv": ((960, 576), 30),
    "o": ((576, 576), 30),
    "gate_up": ((3072, 576), 30),
    "down": ((576, 1536), 30),
    "head": ((49152, 576), 1),
}
GROUP = 32


class Weight(NamedTuple):
    """One matmul's weight: its values, and packed for each kernel."""

    q: torch.Tensor  # [N, K] in 0..15
    d: torch.Tensor  # [N, K / 32] scales
    m: torch.Tensor  # [N, K / 32] minimums: w = d * q + m
    packed: torch.Tensor  # the prototype's layout (pack)
    d_blocks: torch.Tensor
    m_blocks: torch.Tensor
    theirs: torch.Tensor  # torch's int4 layout
    scales_zeros: torch.Tensor


def has_vnni() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags and "avx512bw" in flags


def pack(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [N, K] in 0..15, d and m [N, K / 32] into the kernel's block layout."""
    n, k = q.shape
    groups = k // GROUP
    blocks = q.view(n // 16, 16, groups, GROUP).permute(0, 2, 1, 3)  # [NB, G, lane, 32]
    lo = blocks[..., :16].reshape(n // 16, groups, 16, 4, 4)  # input 4i + b
    hi = blocks[..., 16:].reshape(n // 16, groups, 16, 4, 4)
    packed = (lo | (hi << 4)).permute(0, 1, 3, 2, 4).contiguous().view(n // 16, groups, 4, 64)

    def per_block(t: torch.Tensor) -> torch.Tensor:
        return t.view(n // 16, 16, groups).permute(0, 2, 1).contiguous()

    return packed, per_block(d), per_block(m)


def mean_time(f: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        f()
    started = time.perf_counter()
    for _ in range(reps):
        f()
    return (time.perf_counter() - started) / reps


def torch_pass(weights: list[Weight], xs: dict[int, torch.Tensor]) -> None:
    for w in weights:
        torch.ops.aten._weight_int4pack_mm_for_cpu(
            xs[w.q.shape[1]], w.theirs, GROUP, w.scales_zeros
        )


def ours_pass(kernel: Any, weights: list[Weight], xs: dict[int, torch.Tensor]) -> None:
    for w in weights:
        kernel.vnni_mm(xs[w.q.shape[1]], w.packed, w.d_blocks, w.m_blocks)


def main() -> None:
    if not has_vnni():
        print("this CPU lacks AVX512-VNNI: nothing to measure")
        sys.exit(0)
    started = time.perf_counter()
    kernel: Any = load(
        "exo_vnni_int4",
        sources=[str(Path(__file__).parent / "kernels" / "vnni_int4.cpp")],
        extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni"],
    )
    print(f"kernel compiled in {time.perf_counter() - started:.0f} s")
    gen = torch.Generator().manual_seed(0)
    # One distinct weight per matmul of a step, as in the model: a pass streams them all
    # from memory (~100 MB, more than the caches hold), as a decode step does.
    weights: list[Weight] = []
    ours_bytes = torch_bytes = 0
    for (n, k), count in SHAPES.values():
        for _ in range(count):
            q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen)
            d = torch.rand(n, k // GROUP, generator=gen) * 0.02 + 1e-3
            m = -8 * d + torch.randn(n, k // GROUP, generator=gen) * 1e-3
            packed, d_blocks, m_blocks = pack(q, d, m)
            # torch's kernel dequantizes (q - 8) * scale + zero.
            theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)
            scales_zeros = torch.stack([d.t(), (m + 8 * d).t()], -1).to(torch.bfloat16)
            scales_zeros = scales_zeros.contiguous()
            weights.append(Weight(q, d, m, packed, d_blocks, m_blocks, theirs, scales_zeros))
            ours_bytes += packed.numel() + 4 * (d_blocks.numel() + m_blocks.numel())
            torch_bytes += theirs.numel() * theirs.element_size() + 2 * scales_zeros.numel()
    print(
        f"bytes a step reads: torch {torch_bytes / 1e6:.0f} MB, prototype {ours_bytes / 1e6:.0f} MB"
    )
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for rows in (1, 2, 4):
            xs = {k: torch.randn(rows, k, generator=gen) for k in {w.q.shape[1] for w in weights}}
            xbs = {k: x.to(torch.bfloat16) for k, x in xs.items()}

            torch_s = mean_time(functools.partial(torch_pass, weights, xbs), reps=10)
            ours_s = mean_time(functools.partial(ours_pass, kernel, weights, xs), reps=10)
            print(
                f"{threads} threads, {rows} rows: a step's matmuls, torch int4 "
                f"{torch_s * 1e3:5.2f} ms, VNNI prototype {ours_s * 1e3:5.2f} ms "
                f"({torch_s / ours_s:.2f}x)"
            )
    # Accuracy on a layer-sized and the head's weight, against float32 on the same weights.
    for index in (0, len(weights) - 1):
        w = weights[index]
        n, k = w.q.shape
        dense = (w.q.float().view(n, -1, GROUP) * w.d[..., None] + w.m[..., None]).view(n, k)
        x = torch.randn(4, k, generator=gen)
        reference = x @ dense.t()
        scale = float(reference.abs().max())
        ours = kernel.vnni_mm(x, w.packed, w.d_blocks, w.m_blocks)
        their = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), w.theirs, GROUP, w.scales_zeros
        ).float()
        print(
            f"[{n}, {k}] max error / max |y|: torch (bf16 activations) "
            f"{float((their - reference).abs().max()) / scale:.4f}, prototype (int8 "
            f"activations) {float((ours - reference).abs().max()) / scale:.4f}"
        )


if __name__ == "__main__":
    main()
