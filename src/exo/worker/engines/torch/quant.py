"""Weight-only quantized linear layers for the torch engine.

Checkpoints hold weights either dense or in MLX's affine layout: per group of `group_size`
inputs, w = scale * q + bias with unsigned q packed little-end first into uint32 words.
Every format below is built from that one intermediate (`AffineWeight`):

- `QmmLinear`: our 4-/8-bit weight x int8 activation kernel (`cpu_ops.py`) on x86-64
  CPUs with AVX2 (AVX512-VNNI where present), where it builds. The default there;
  `Int4Linear` elsewhere.
- `Int4Linear`: torch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`), bf16 activations.
  The kernel dequantizes as (q - 8) * scale + zero, so zero = bias + 8 * scale.
  8-bit weights run on the same kernel as two 4-bit planes, q = 16 * hi + lo, laid side by
  side along the input axis (the input is repeated): no requantization, and the fast
  kernel (torch's int8 kernel is slower than float32 on this CPU, FINDINGS).
- `DenseLinear`: dequantized (or cast) weights for float32 (exact reference), bfloat16 and
  float16 (CUDA).
"""

from dataclasses import dataclass, replace
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from exo.worker.engines.torch import cpu_ops

WeightFormat = Literal["int4", "bfloat16", "float16", "float32"]
DENSE_DTYPES: dict[WeightFormat, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# Group sizes torch's int4 CPU kernel accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)
# The int4 kernel packs output rows in blocks of 16.
_INT4_ROW_MULTIPLE = 16
# Rows unpacked or packed at a time while loading (a multiple of the above).
_ROWS_PER_BLOCK = 1024
# The int4 kernel's zero point: it dequantizes (q - 8) * scale + zero.
_INT4_MIDPOINT = 8
# float16 (our matmul kernel's scales) overflows past this.
_FLOAT16_MAX = 65504.0


class Linear(Protocol):
    """y = x W^T + b for x [..., in_features]."""

    @property
    def in_features(self) -> int: ...

    @property
    def out_features(self) -> int: ...

    def __call__(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class AffineWeight:
    """Unpacked affine-quantized weight: w[n, k] = scales[n, k // g] * q[n, k] + biases[n, k // g]."""

    q: Tensor  # uint8 [out, in]
    scales: Tensor  # float32 [out, in / group_size]
    biases: Tensor  # float32 [out, in / group_size]
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1])

    def dequantize(self) -> Tensor:
        """float32 [out, in]; scales and biases stay float32 so nothing rounds (FINDINGS)."""
        out, n_in = self.shape
        groups = self.q.view(out, n_in // self.group_size, self.group_size).float()
        return (groups * self.scales[..., None] + self.biases[..., None]).view(out, n_in)

    @staticmethod
    def concat(parts: "list[AffineWeight]") -> "AffineWeight":
        """Stack along the output axis (fusing q/k/v or gate/up into one matmul)."""
        first = parts[0]
        if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot fuse weights quantized differently")
        return AffineWeight(
            q=torch.cat([p.q for p in parts]),
            scales=torch.cat([p.scales for p in parts]),
            biases=torch.cat([p.biases for p in parts]),
            bits=first.bits,
            group_size=first.group_size,
        )


def unpack_mlx(packed: Tensor, scales: Tensor, biases: Tensor, group_size: int) -> AffineWeight:
    """MLX affine layout -> AffineWeight.

    MLX packs each row's values as one little-endian bit stream (value j in bits
    [j*b, (j+1)*b)) stored in uint32 words, for every width 2-8: 3-, 5- and 6-bit values
    cross byte and word boundaries. A value of at most 8 bits spans at most two bytes, so each
    is read from the 16 bits at its first byte."""
    out = packed.shape[0]
    n_in = scales.shape[1] * group_size
    bits = packed.shape[1] * 32 // n_in
    if bits not in range(2, 9) or packed.shape[1] * 32 != n_in * bits:
        # Not a stub: no MLX layout has this width, so the checkpoint's shapes disagree.
        raise ValueError(
            f"{packed.shape[1] * 32 / n_in:g}-bit affine weights: not an MLX layout (2 to 8 "
            "bits); the checkpoint's weight and scales shapes do not agree"
        )
    raw = packed.view(torch.uint8)
    if 8 % bits == 0:
        # 2, 4 and 8 bits never cross a byte: value j of a byte sits at bits [j*b, (j+1)*b).
        # Shifts and a mask, no gathers: 8x (4 bits) to 40x (8 bits) faster than below.
        per_byte = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
        q = (raw.unsqueeze(-1) >> shifts) & ((1 << bits) - 1) if per_byte > 1 else raw.clone()
        return AffineWeight(
            q=q.reshape(out, n_in),
            scales=scales.float(),
            biases=biases.float(),
            bits=bits,
            group_size=group_size,
        )
    offsets = torch.arange(n_in, dtype=torch.int64) * bits
    first, shifts = offsets // 8, (offsets % 8).to(torch.int32)
    q = torch.empty((out, n_in), dtype=torch.uint8)
    # Row blocks keep the int32 scratch small (a vocabulary-sized table is 28M values).
    for row in range(0, out, _ROWS_PER_BLOCK):
        # One zero byte past the end: the last value's second byte.
        block = F.pad(raw[row : row + _ROWS_PER_BLOCK], (0, 1)).to(torch.int32)
        pairs = block[:, first] | (block[:, first + 1] << 8)
        q[row : row + _ROWS_PER_BLOCK] = ((pairs >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
    return AffineWeight(
        q=q,
        scales=scales.float(),
        biases=biases.float(),
        bits=bits,
        group_size=group_size,
    )


def quantize_affine(weight: Tensor, bits: int, group_size: int) -> AffineWeight:
    """Min-max affine quantization of a dense [out, in] weight (for dense checkpoints)."""
    out, n_in = weight.shape
    groups = weight.float().view(out, n_in // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    levels = (1 << bits) - 1
    scales = ((high - low) / levels).clamp_min(1e-8)
    q = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, levels)
    return AffineWeight(q.view(out, n_in).to(torch.uint8), scales, low, bits, group_size)


class DenseLinear:
    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        self.weight = weight
        self.bias = bias

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


class Int4Linear:
    """Groupwise 4-bit (or 8-bit as two 4-bit planes) weights on torch's int4 CPU kernel.

    Takes and returns bfloat16 (the only activation dtype the kernel is fast for: float32
    runs ~70x slower here); callers promote the result into their float32 residual.
    """

    def __init__(
        self,
        packed: Tensor,
        scales_and_zeros: Tensor,
        group_size: int,
        planes: int,
        in_features: int,
        bias: Tensor | None,
    ) -> None:
        self.packed = packed
        self.scales_and_zeros = scales_and_zeros
        self.group_size = group_size
        self.planes = planes
        self._in_features = in_features
        self.bias = bias

    @classmethod
    def from_affine(cls, weight: AffineWeight, bias: Tensor | None) -> "Int4Linear":
        if weight.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group size {weight.group_size} is not one the int4 kernel takes")
        if weight.bits == 4:
            q, scales, zeros, planes = weight.q, weight.scales, weight.biases, 1
        elif weight.bits == 8:
            # w = s*q + b = (16 s * hi + b) + s * lo: two 4-bit planes. The bias goes with
            # the high plane, where the kernel's zero (b + 128 s) is ~0 for symmetric
            # weights, so rounding it to bf16 costs nothing.
            hi, lo = weight.q >> 4, weight.q & 15
            q = torch.cat([hi, lo], dim=1)
            scales = torch.cat([16 * weight.scales, weight.scales], dim=1)
            zeros = torch.cat([weight.biases, torch.zeros_like(weight.biases)], dim=1)
            planes = 2
        else:
            raise ValueError(f"{weight.bits}-bit weights do not fit the int4 kernel")
        # Packed by row blocks (the layout is per block of 16 rows): small int32 scratch.
        packed = torch.cat(
            [
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                    q[row : row + _ROWS_PER_BLOCK].to(torch.int32), 1
                )
                for row in range(0, q.shape[0], _ROWS_PER_BLOCK)
            ]
        )
        kernel_zeros = zeros + _INT4_MIDPOINT * scales
        # [in / group, out, 2]: the kernel's layout.
        scales_and_zeros = torch.stack([scales, kernel_zeros], dim=-1).transpose(0, 1)
        return cls(
            packed,
            scales_and_zeros.contiguous().to(torch.bfloat16),
            weight.group_size,
            planes,
            weight.shape[1],
            None if bias is None else bias.to(torch.bfloat16),
        )

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def weight_bytes(self) -> int:
        """What one call reads: packed values, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_and_zeros))

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.planes == 2:
            x2 = torch.cat((x2, x2), dim=-1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x2, self.packed, self.group_size, self.scales_and_zeros
        )
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, y.shape[-1])


class QmmLinear:
    """4-bit or 8-bit groupwise weights on our matmul kernel (`cpu_ops.qmm`).

    Takes any float activations and returns float32 (the residual's dtype). Scales and
    minimums are kept in float16: exact for GGUF and float16 MLX checkpoints."""

    def __init__(
        self, packed: Tensor, d: Tensor, m: Tensor, in_features: int, bias: Tensor | None
    ) -> None:
        self.packed = packed
        self.d = d
        self.m = m
        self._in_features = in_features
        self.bias = bias
        self.avx2 = cpu_ops.forced_avx2()

    @staticmethod
    def fits(weight: AffineWeight) -> bool:
        """Whether the kernel takes this weight: 4 or 8 bits, rows in blocks of 16, groups
        of a multiple of 32 inputs, scales and minimums within float16's range."""
        out, n_in = weight.shape
        return (
            weight.bits in (4, 8)
            and out % cpu_ops.BLOCK_ROWS == 0
            and weight.group_size % cpu_ops.GROUP == 0
            and n_in % weight.group_size == 0
            and bool(weight.scales.abs().max() < _FLOAT16_MAX)
            and bool(weight.biases.abs().max() < _FLOAT16_MAX)
        )

    @classmethod
    def from_affine(cls, weight: AffineWeight, bias: Tensor | None) -> "QmmLinear":
        if not cls.fits(weight):
            raise ValueError("this weight does not fit our matmul kernel")
        # The kernel's scales are per 32 inputs: larger groups repeat theirs.
        repeat = weight.group_size // cpu_ops.GROUP
        d = weight.scales.repeat_interleave(repeat, dim=1)
        m = weight.biases.repeat_interleave(repeat, dim=1)
        parts = [
            cpu_ops.pack(
                weight.q[row : row + _ROWS_PER_BLOCK],
                d[row : row + _ROWS_PER_BLOCK],
                m[row : row + _ROWS_PER_BLOCK],
                weight.bits,
            )
            for row in range(0, weight.shape[0], _ROWS_PER_BLOCK)
        ]
        return cls(
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]),
            weight.shape[1],
            None if bias is None else bias.float(),
        )

    @property
    def in_features(self) -> int:
        return self._in_features

    @property
    def out_features(self) -> int:
        return self.packed.shape[0] * cpu_ops.BLOCK_ROWS

    @property
    def weight_bytes(self) -> int:
        """What one call reads: packed values, scales and minimums."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.d, self.m))

    def __call__(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        y = cpu_ops.qmm(x2, self.packed, self.d, self.m, self.avx2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, y.shape[-1])


def int4_kernel_available() -> bool:
    """Whether this torch build has the CPU int4 kernels (torch >= 2.6 on x86/arm CPUs)."""
    try:
        q = torch.zeros((_INT4_ROW_MULTIPLE, 32), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.zeros((1, _INT4_ROW_MULTIPLE, 2), dtype=torch.bfloat16)
        x = torch.zeros((1, 32), dtype=torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def make_linear(
    weight: AffineWeight | Tensor,
    bias: Tensor | None,
    fmt: WeightFormat,
    device: torch.device,
) -> Linear:
    """The layer for one (possibly fused) weight in the chosen format."""
    if fmt == "int4":
        if device.type != "cpu":
            raise ValueError("the int4 format runs on CPU only")
        affine = weight if isinstance(weight, AffineWeight) else quantize_affine(weight, 4, 32)
        if affine.bits not in (4, 8):
            # 2-, 3-, 5- and 6-bit values are 8-bit values below 2**bits: the same weight,
            # exactly, in a width the kernels take (a byte each in memory).
            affine = replace(affine, bits=8)
        if QmmLinear.fits(affine) and cpu_ops.available():
            return QmmLinear.from_affine(affine, bias)
        fits = affine.shape[0] % _INT4_ROW_MULTIPLE == 0 and affine.group_size in INT4_GROUP_SIZES
        if fits:
            return Int4Linear.from_affine(affine, bias)
        fmt = "bfloat16"
    dtype = DENSE_DTYPES[fmt]
    dense = weight.dequantize() if isinstance(weight, AffineWeight) else weight
    return DenseLinear(
        dense.to(device=device, dtype=dtype),
        None if bias is None else bias.to(device=device, dtype=dtype),
    )


class QuantizedEmbedding:
    """Rows of an affine-quantized table, dequantized (in float32, exactly) only when gathered."""

    def __init__(self, weight: AffineWeight, dtype: torch.dtype) -> None:
        self.q = weight.q
        # float16 holds checkpoint scales exactly and halves their memory.
        self.scales = weight.scales.to(torch.float16)
        self.biases = weight.biases.to(torch.float16)
        self.group_size = weight.group_size
        self.dtype = dtype

    def __call__(self, ids: Tensor) -> Tensor:
        q = self.q[ids]
        groups = q.view(*q.shape[:-1], -1, self.group_size).float()
        rows = groups * self.scales[ids].float()[..., None] + self.biases[ids].float()[..., None]
        return rows.view(q.shape).to(self.dtype)


class DenseEmbedding:
    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        self.weight = weight
        self.dtype = dtype

    def __call__(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight).to(self.dtype)
