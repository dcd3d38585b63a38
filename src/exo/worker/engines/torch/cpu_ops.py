"""Our CPU kernels, built at first use: a 4-/8-bit weight x int8 activation matmul
(`kernels/qmm.cpp`, op `exo::qmm`) and a batched decode attention
(`kernels/decode_attention.cpp`, op `exo::decode_attention`), each for AVX512(-VNNI) and
for AVX2, chosen at run time by the CPU.

torch's int4 CPU kernel dequantizes each weight block once per row of input, so four
batched requests cost it ~1.7x one. Ours quantizes the activations per group of 32 inputs
to two int8 parts (~15 bits: finer than the bf16 torch's kernel takes) and multiplies them
with the 4-bit or 8-bit weights in int32 (vpdpbusd on AVX512-VNNI, vpmaddubsw + vpmaddwd
on AVX2; the two give bitwise equal results), reading each weight block once for up to
four rows. The attention kernel replaces one SDPA call per request and layer (~27 us
each, mostly dispatch) with one call per layer for the whole batch.

The engine uses both on x86-64 CPUs with AVX2, FMA and F16C where a C++ compiler is
present (the one inductor needs too); anywhere else, or with `EXO_TORCH_CPU_KERNELS=torch`,
it keeps torch's. The extension is compiled once per machine (~10 s) into the compile
cache (`$TORCHINDUCTOR_CACHE_DIR/exo_kernels`; the worker points that at the node's cache)
or torch's extension folder, and only loaded afterwards (~0.2 s). Measurements and
accuracy: docs/torch_engine.md.
"""

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path

import torch
from loguru import logger
from torch import Tensor

from exo.worker.cpu_features import cpu_flags, kernels_for

# "torch" keeps torch's int4 kernel and SDPA; "ours" (or unset) uses ours where they build,
# "avx2" ours in their AVX2 variants only.
KERNEL_ENV = "EXO_TORCH_CPU_KERNELS"
_SOURCES = [
    Path(__file__).parent / "kernels" / "qmm.cpp",
    Path(__file__).parent / "kernels" / "decode_attention.cpp",
]
# Each kernel function names its instruction set (`target` attributes): no -m flags, so
# the extension loads on any x86-64 CPU and picks its variant there.
_CFLAGS = ["-O3"]
# The extension's name; a new name for a change of the op schemas.
_NAME = "exo_cpu_ops_v1"
# ATen's parallel_for is an OpenMP pragma in its header: without -fopenmp it runs on one
# thread. The extension then needs libgomp.so.1, which resolves to the one torch loaded.
_OPENMP = ["-fopenmp"]
GROUP = 32
BLOCK_ROWS = 16

_lock = threading.Lock()
_loaded: bool | None = None
_forced_avx2 = False


def _cpu_has_avx2() -> bool:
    # What the AVX2 variant needs; the AVX-512 one is chosen at run time where the CPU has it.
    return kernels_for(cpu_flags()) in ("avx2", "avx512-vnni")


def _build_directory() -> Path | None:
    # A folder per extension name and source folder: builds of different versions never
    # share a build file, and two installs sharing one cache (a checkout and its clone) do
    # not rebuild each other's (ninja's build file names the sources by absolute path).
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not cache:
        return None
    where = hashlib.sha256(str(_SOURCES[0].parent).encode()).hexdigest()[:12]
    return Path(cache) / "exo_kernels" / f"{_NAME}-{where}"


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH: ours comes with the environment
    (the `ninja` wheel), which PATH lacks when the daemon was started by its full path."""
    try:
        import ninja  # pyright: ignore[reportMissingTypeStubs]
    except ImportError:
        return
    bin_dir = str(ninja.BIN_DIR)  # pyright: ignore[reportUnknownMemberType, reportUnknownArgumentType]
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path if path else bin_dir


def _build_and_load() -> None:
    from torch.utils.cpp_extension import load  # pyright: ignore[reportUnknownVariableType]

    _ninja_on_path()

    directory = _build_directory()
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    load(
        name=_NAME,
        sources=[str(source) for source in _SOURCES],
        extra_cflags=_CFLAGS + _OPENMP,
        extra_ldflags=_OPENMP,
        build_directory=None if directory is None else str(directory),
        is_python_module=False,
        verbose=False,
    )

    # Shapes for the compiler (torch.compile traces with fake tensors); both variants.
    for variant in ("", "_avx2"):
        torch.library.register_fake(f"exo::qmm{variant}", _qmm_shape)  # pyright: ignore[reportUnknownMemberType]
        torch.library.register_fake(f"exo::decode_attention{variant}", _attention_shape)  # pyright: ignore[reportUnknownMemberType]


def _qmm_shape(x: Tensor, w: Tensor, d: Tensor, m: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], w.shape[0] * BLOCK_ROWS))


def _attention_shape(
    q: Tensor, keys: list[Tensor], values: list[Tensor], lengths: list[int], scale: float
) -> Tensor:
    return q.new_empty(q.shape)


def available() -> bool:
    """Whether layers should run on our kernels: not refused by $EXO_TORCH_CPU_KERNELS, an
    x86-64 CPU with AVX2, a C++ compiler, and the extension built and loaded (once a
    process)."""
    global _loaded, _forced_avx2
    choice = os.environ.get(KERNEL_ENV, "").strip() or "ours"
    if choice not in ("ours", "avx2", "torch"):
        raise ValueError(f"${KERNEL_ENV}={choice!r}; expected ours, avx2 or torch")
    if choice == "torch":
        return False
    with _lock:
        if _loaded is None:
            _loaded = _try_to_load()
        _forced_avx2 = choice == "avx2"
        return _loaded


def forced_avx2() -> bool:
    """$EXO_TORCH_CPU_KERNELS=avx2: the AVX2 variants even on an AVX-512 CPU (to measure
    what CPUs without AVX-512 get). Read when layers are built."""
    return _forced_avx2


def _try_to_load() -> bool:
    if not _cpu_has_avx2():
        return False
    if shutil.which("c++") is None and shutil.which("g++") is None:
        logger.warning("no C++ compiler: the quantized layers use torch's int4 kernel")
        return False
    started = time.perf_counter()
    try:
        _build_and_load()
    except Exception as error:  # a compiler or toolchain failure of any kind
        logger.warning(f"building our CPU kernels failed ({error}); using torch's")
        return False
    logger.debug(f"our CPU kernels ready in {time.perf_counter() - started:.1f} s")
    return True


def pack(q: Tensor, d: Tensor, m: Tensor, bits: int) -> tuple[Tensor, Tensor, Tensor]:
    """q uint8 [N, K] in 0..2^bits - 1, d and m float [N, K / 32] (w = d * q + m) -> the
    kernel's blocks: uint8 [N / 16, K / 32, L, 64] (L = 4 for 4 bits, 8 for 8 bits) and
    float16 [N / 16, K / 32, 16] twice."""
    n, k = q.shape
    nb, groups = n // BLOCK_ROWS, k // GROUP
    blocks = q.view(nb, BLOCK_ROWS, groups, GROUP).permute(0, 2, 1, 3)  # [nb, g, lane, 32]
    if bits == 4:
        # Input 4i + b of the group's low half in the low nibble, of its high half above.
        low = blocks[..., : GROUP // 2].reshape(nb, groups, BLOCK_ROWS, 4, 4)
        high = blocks[..., GROUP // 2 :].reshape(nb, groups, BLOCK_ROWS, 4, 4)
        words = low | (high << 4)
    elif bits == 8:
        words = blocks.reshape(nb, groups, BLOCK_ROWS, 8, 4)
    else:
        raise ValueError(f"our matmul takes 4- or 8-bit weights, not {bits}-bit")
    # [nb, g, lane, i, b] -> [nb, g, i, lane, b]: load i holds word i of every lane.
    packed = words.permute(0, 1, 3, 2, 4).contiguous().view(nb, groups, -1, 64)

    def per_block(t: Tensor) -> Tensor:
        return t.reshape(nb, BLOCK_ROWS, groups).permute(0, 2, 1).half().contiguous()

    return packed, per_block(d), per_block(m)


def attention_fits(head_dim: int) -> bool:
    """Whether `decode_attention` takes heads of this size (float32 on the CPU): a multiple
    of 16 values, at most 128 (what its registers hold)."""
    return head_dim % 16 == 0 and head_dim <= 128


def decode_attention(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    lengths: list[int],
    scale: float,
    avx2: bool = False,
) -> Tensor:
    """Attention of q [B, heads, 1, d] over the first lengths[b] positions of request b's
    cache (keys[b], values[b]: [n_kv, capacity, d]): [B, heads, 1, d]. `avx2` forces the
    AVX2 variant (for tests)."""
    if avx2:
        return torch.ops.exo.decode_attention_avx2(q, keys, values, lengths, scale)
    return torch.ops.exo.decode_attention(q, keys, values, lengths, scale)


def qmm(x: Tensor, packed: Tensor, d: Tensor, m: Tensor, avx2: bool = False) -> Tensor:
    """float32 x [M, K] (contiguous) times the packed weight, transposed: float32 [M, N].
    `avx2` forces the AVX2 variant (tests compare it with the AVX-512 one)."""
    if avx2:
        return torch.ops.exo.qmm_avx2(x, packed, d, m)
    return torch.ops.exo.qmm(x, packed, d, m)
