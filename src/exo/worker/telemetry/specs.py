"""Published memory bandwidth and compute throughput, keyed by the name a driver reports.

Every number cites the vendor page it was transcribed from. Compute is *dense* (no 2:4
sparsity) at the precision an engine runs a model in: fp16/bf16 tensor cores for NVIDIA
data-centre parts; fp16 tensor cores with fp32 accumulation for GeForce parts (what PyTorch's
fp16 matmuls use; the whitepapers list both). A figure the vendor does not publish is left
`None` and the micro-benchmark measures it instead (Apple publishes bandwidth, not FLOPS for
every chip). Entries are tried in order; the first whose pattern is found in the device name
wins, so specific variants come before the generic name.
"""

import re
from dataclasses import dataclass

_TB = 1e12
_GB = 1e9
_TFLOPS = 1e12

_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet, dense = half the sparsity figure)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet, dense = half the sparsity figure)"
_A100 = "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
_L40S = (
    "https://www.nvidia.com/en-us/data-center/l40s/ (L40S datasheet, BF16/FP16 Tensor dense figure)"
)
_L4 = (
    "https://www.nvidia.com/en-us/data-center/l4/ (L4 datasheet, dense = half the sparsity figure)"
)
_A10 = "https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (A10 datasheet, dense = half the sparsity figure)"
_T4 = "https://www.nvidia.com/en-us/data-center/tesla-t4/ (T4 datasheet, mixed-precision FP16/FP32)"
_V100 = "https://images.nvidia.com/content/technologies/volta/pdf/volta-v100-datasheet-update-us-1165301-r5.pdf"
_ADA = "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf (Appendix A, FP16 Tensor with FP32 accumulate, dense)"
_GA102 = "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf (Appendix A, FP16 Tensor with FP32 accumulate, dense)"
_M1PM = "https://www.apple.com/newsroom/2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built/"
_M1U = "https://www.apple.com/newsroom/2022/03/apple-unveils-m1-ultra-the-worlds-most-powerful-chip-for-a-personal-computer/"
_M2 = "https://www.apple.com/newsroom/2022/06/apple-unveils-m2-with-breakthrough-performance-and-capabilities/"
_M2PM = "https://www.apple.com/newsroom/2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/"
_M2U = "https://www.apple.com/newsroom/2023/06/apple-introduces-m2-ultra/"
_M3 = "https://www.apple.com/newsroom/2023/10/apple-unveils-m3-m3-pro-and-m3-max-the-most-advanced-chips-for-a-personal-computer/"
_M4 = "https://www.apple.com/newsroom/2024/05/apple-introduces-m4-chip/"
_M4PM = "https://www.apple.com/newsroom/2024/10/apple-introduces-m4-pro-and-m4-max/"


@dataclass(frozen=True)
class SpecEntry:
    pattern: str
    label: str
    memory_bandwidth_bytes_per_s: float | None
    compute_flops: float | None
    source: str


SPEC_TABLE: tuple[SpecEntry, ...] = (
    # NVIDIA data centre (name as NVML reports it, e.g. "NVIDIA H100 80GB HBM3").
    SpecEntry(r"H200 NVL", "H200 NVL", 4.8 * _TB, 835.5 * _TFLOPS, _H200),
    SpecEntry(r"H200", "H200 SXM", 4.8 * _TB, 989.5 * _TFLOPS, _H200),
    SpecEntry(r"H100 NVL", "H100 NVL", 3.9 * _TB, 835.5 * _TFLOPS, _H100),
    SpecEntry(r"H100 PCIe", "H100 PCIe", 2.0 * _TB, 756.5 * _TFLOPS, _H100),
    SpecEntry(r"H100", "H100 SXM", 3.35 * _TB, 989.5 * _TFLOPS, _H100),
    SpecEntry(
        r"A100.*(PCIE.*80GB|80GB.*PCIe)", "A100 80GB PCIe", 1.935 * _TB, 312 * _TFLOPS, _A100
    ),
    SpecEntry(r"A100.*80GB", "A100 80GB SXM", 2.039 * _TB, 312 * _TFLOPS, _A100),
    SpecEntry(r"A100", "A100 40GB", 1.555 * _TB, 312 * _TFLOPS, _A100),
    SpecEntry(r"L40S", "L40S", 864 * _GB, 362.05 * _TFLOPS, _L40S),
    SpecEntry(r"\bL4\b", "L4", 300 * _GB, 121.0 * _TFLOPS, _L4),
    SpecEntry(r"\bA10\b", "A10", 600 * _GB, 125 * _TFLOPS, _A10),
    SpecEntry(r"\bT4\b", "T4", 320 * _GB, 65 * _TFLOPS, _T4),
    SpecEntry(r"V100.*PCIE", "V100 PCIe", 900 * _GB, 112 * _TFLOPS, _V100),
    SpecEntry(r"V100", "V100 SXM2", 900 * _GB, 125 * _TFLOPS, _V100),
    # NVIDIA GeForce.
    SpecEntry(r"RTX 4090", "GeForce RTX 4090", 1008 * _GB, 165.2 * _TFLOPS, _ADA),
    SpecEntry(r"RTX 4080", "GeForce RTX 4080", 716.8 * _GB, 97.5 * _TFLOPS, _ADA),
    SpecEntry(r"RTX 3090", "GeForce RTX 3090", 936 * _GB, 71 * _TFLOPS, _GA102),
    SpecEntry(r"RTX 3080", "GeForce RTX 3080", 760 * _GB, 59.5 * _TFLOPS, _GA102),
    # Apple silicon (Metal's device name, e.g. "Apple M2 Max"): unified memory bandwidth;
    # the highest-binned variant where Apple says "up to".
    SpecEntry(r"Apple M1 Ultra", "Apple M1 Ultra", 800 * _GB, None, _M1U),
    SpecEntry(r"Apple M1 Max", "Apple M1 Max", 400 * _GB, None, _M1PM),
    SpecEntry(r"Apple M1 Pro", "Apple M1 Pro", 200 * _GB, None, _M1PM),
    SpecEntry(r"Apple M2 Ultra", "Apple M2 Ultra", 800 * _GB, None, _M2U),
    SpecEntry(r"Apple M2 Max", "Apple M2 Max", 400 * _GB, None, _M2PM),
    SpecEntry(r"Apple M2 Pro", "Apple M2 Pro", 200 * _GB, None, _M2PM),
    SpecEntry(r"Apple M2\b", "Apple M2", 100 * _GB, None, _M2),
    SpecEntry(r"Apple M3 Max", "Apple M3 Max", 400 * _GB, None, _M3),
    SpecEntry(r"Apple M3 Pro", "Apple M3 Pro", 150 * _GB, None, _M3),
    SpecEntry(r"Apple M3\b", "Apple M3", 100 * _GB, None, _M3),
    SpecEntry(r"Apple M4 Max", "Apple M4 Max", 546 * _GB, None, _M4PM),
    SpecEntry(r"Apple M4 Pro", "Apple M4 Pro", 273 * _GB, None, _M4PM),
    SpecEntry(r"Apple M4\b", "Apple M4", 120 * _GB, None, _M4),
)

_COMPILED = tuple((re.compile(e.pattern, re.IGNORECASE), e) for e in SPEC_TABLE)


def lookup(name: str) -> SpecEntry | None:
    for pattern, entry in _COMPILED:
        if pattern.search(name):
            return entry
    return None
