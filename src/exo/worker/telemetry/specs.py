"""Published memory bandwidth and compute throughput, keyed by the name a driver reports.

Every entry carries two strings:

- `source`: the vendor document the numbers come from (URL plus where in it), which is
  what a device's `PerfFigure.detail` cites;
- `checked`: how that transcription was last checked. The vendor pages themselves could not
  be fetched in the checking session (no network there); each figure was compared against a
  verbatim reproduction of the vendor's own table or press release (named in `checked`), or,
  where none was found, against independent secondary sources, which `checked` then says.

Compute is *dense* (no 2:4 sparsity; NVIDIA datasheets print the sparse figure with an
asterisk, so dense = half of it) at the precision an engine runs a model in: BF16/FP16
Tensor Core for NVIDIA data-centre parts; FP16 Tensor Core with FP32 accumulate for GeForce
parts (what PyTorch's fp16/bf16 matmuls use; GeForce runs FP32 accumulation at half the FP16
accumulate rate, and the whitepapers list both). A figure the vendor does not publish is left
`None` and the micro-benchmark measures it instead (Apple publishes unified memory bandwidth
but no per-chip matmul throughput). Entries are tried in order; the first whose pattern is
found in the device name wins, so specific variants come before the generic name. Patterns
for a base model are anchored so that an unlisted variant (GH200, V100S, RTX 4090 D,
RTX 4080 SUPER, a laptop part, Apple M4 Ultra...) falls through to measurement instead of
inheriting the wrong figures.
"""

import re
from dataclasses import dataclass

_TB = 1e12
_GB = 1e9
_TFLOPS = 1e12

# --- NVIDIA: where each number is printed ------------------------------------------------
_H100 = (
    "https://www.nvidia.com/en-us/data-center/h100/ (H100 datasheet: BF16 Tensor Core"
    " 1,979 SXM / 1,671 NVL / 1,513 PCIe TFLOPS with sparsity; dense = half)"
)
_H200 = (
    "https://www.nvidia.com/en-us/data-center/h200/ (H200 datasheet: BF16 Tensor Core"
    " 1,979 SXM / 1,671 NVL TFLOPS with sparsity, 4.8TB/s; dense = half)"
)
_A100 = (
    "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
    "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (BF16 Tensor Core 312 TFLOPS dense;"
    " 1,555 / 1,935 / 2,039 GB/s for 40GB, 80GB PCIe, 80GB SXM)"
)
_L40S = (
    "https://www.nvidia.com/en-us/data-center/l40s/ (L40S datasheet: BF16 Tensor Core"
    " 362.05 dense | 733 sparse TFLOPS, 864GB/s)"
)
_L40 = (
    "https://www.nvidia.com/en-us/data-center/l40/ (L40 datasheet: BF16 Tensor Core"
    " 181.05 dense | 362.1 sparse TFLOPS, 864GB/s)"
)
_L4 = (
    "https://www.nvidia.com/en-us/data-center/l4/ (L4 datasheet: FP16/BF16 Tensor Core"
    " 242 TFLOPS with sparsity, 300GB/s; dense = half)"
)
_A10 = (
    "https://www.nvidia.com/en-us/data-center/products/a10-gpu/ (A10 datasheet: BF16 Tensor"
    " Core 125 | 250 sparse TFLOPS, 600GB/s)"
)
_T4 = (
    "https://www.nvidia.com/en-us/data-center/tesla-t4/ (T4 datasheet: Mixed Precision"
    " FP16/FP32 65 TFLOPS, 320GB/s; Turing has no sparsity)"
)
_V100 = (
    "https://images.nvidia.com/content/technologies/volta/pdf/"
    "volta-v100-datasheet-update-us-1165301-r5.pdf (Tensor Performance 125 SXM2 / 112 PCIe"
    " TFLOPS, 900GB/s; Volta has no sparsity)"
)
_ADA = (
    "https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf"
    " (Table 1 for RTX 4090, Appendix A for RTX 4080: Peak FP16 Tensor TFLOPS with FP32"
    " Accumulate, dense)"
)
_GA102 = (
    "https://www.nvidia.com/content/PDF/nvidia-ampere-ga-102-gpu-architecture-whitepaper-v2.pdf"
    " (Table 1 for RTX 3080, Appendix A for RTX 3090: Peak FP16 Tensor TFLOPS with FP32"
    " Accumulate, dense)"
)
# --- Apple ----------------------------------------------------------------------------------
_M1PM = "https://www.apple.com/newsroom/2021/10/introducing-m1-pro-and-m1-max-the-most-powerful-chips-apple-has-ever-built/"
_M1U = "https://www.apple.com/newsroom/2022/03/apple-unveils-m1-ultra-the-worlds-most-powerful-chip-for-a-personal-computer/"
_M2 = "https://www.apple.com/newsroom/2022/06/apple-unveils-m2-with-breakthrough-performance-and-capabilities/"
_M2PM = "https://www.apple.com/newsroom/2023/01/apple-unveils-m2-pro-and-m2-max-next-generation-chips-for-next-level-workflows/"
_M2U = "https://www.apple.com/newsroom/2023/06/apple-introduces-m2-ultra/"
_M3PM = (
    "https://support.apple.com/en-us/117737 (MacBook Pro 16-inch, Nov 2023, Tech Specs:"
    " M3 Pro 150GB/s; M3 Max 300GB/s or, 16-core CPU / 40-core GPU, 400GB/s)"
)
_M3 = (
    "Apple MacBook Pro (14-inch, M3, Nov 2023) Tech Specs, support.apple.com (M3 100GB/s);"
    " chip announced at https://www.apple.com/newsroom/2023/10/apple-unveils-m3-m3-pro-and-"
    "m3-max-the-most-advanced-chips-for-a-personal-computer/"
)
_M3U = (
    "https://www.apple.com/mac-studio/specs/ (Mac Studio 2025 Tech Specs: M3 Ultra 819GB/s);"
    " https://www.apple.com/newsroom/2025/03/apple-reveals-m3-ultra-taking-apple-silicon-to-"
    "a-new-extreme/ says 'over 800GB/s'"
)
_M4PM = "https://www.apple.com/newsroom/2024/10/apple-introduces-m4-pro-and-m4-max/"
_M5 = "https://www.apple.com/newsroom/2025/10/apple-unleashes-m5-the-next-big-leap-in-ai-performance-for-apple-silicon/"

# --- how each was checked --------------------------------------------------------------------
_CHK_H100 = (
    "vendor page not fetchable; SXM 3.35TB/s and 989.4 dense BF16 match the Hopper"
    " whitepaper figures as tabulated at https://glennklockwood.com/garden/processors/h100;"
    " PCIe '>2,000 GBps' per NVIDIA product brief PB-11133-001 (copy at manuals.plus); NVL"
    " 3.9TB/s / 1,671 sparse from the current datasheet, secondary copies only"
)
_CHK_H200 = (
    "vendor page not fetchable; 4.8TB/s and 1,979 sparse BF16 (SXM) confirmed by several"
    " secondary copies of the datasheet; NVL 1,671 sparse from the datasheet, no copy found"
)
_CHK_A100 = (
    "checked in an earlier session against secondary sources; 1,555 GB/s (40GB) and 312 TFLOPS"
    " again match independent listings (e.g. the A100 40GB/80GB rows in public GPU catalogs)"
)
_CHK_L40 = (
    "matches NVIDIA's L40 / L40S datasheet table as reproduced verbatim at"
    " https://www.mullet.se/product.html?product_id=355414 (BF16 181.05|362.1* and"
    " 362.05|733*, 864GB/s)"
)
_CHK_L4 = (
    "vendor page not fetchable; 300GB/s and 242 TFLOPS FP16 'with sparsity' per secondary"
    " summaries of the datasheet (no verbatim copy found)"
)
_CHK_A10 = (
    "vendor page not fetchable; 600GB/s and 125 TFLOPS per secondary sources only"
    " (baseten.co A10 vs A10G, gist.github.com/kimbochen); no verbatim copy found"
)
_CHK_T4 = (
    "vendor page not fetchable; 65 TFLOPS FP16/FP32 mixed and 320GB/s match secondary"
    " sources (launch coverage, TechPowerUp-derived listings)"
)
_CHK_V100 = (
    "vendor PDF not fetchable; 125 TFLOPS (SXM2) and 900GB/s match secondary sources;"
    " 112 TFLOPS (PCIe) not found in a copy"
)
_CHK_ADA = (
    "whitepaper PDF not fetchable and its tables not in any copy found; 1,008 GB/s and"
    " 165.2 dense FP16/FP32-acc (4090) match independent listings (165.15 at 2,520 MHz)"
)
_CHK_GA102 = (
    "whitepaper PDF not fetchable (copies exist on scribd/studylib but their tables could not"
    " be read); 936 / 760 GB/s match independent listings"
)
_CHK_APPLE_PR = "newsroom text, reproduced verbatim by press coverage of the announcement"
_CHK_M3PM = "Apple Tech Specs page itself (support.apple.com/en-au/117737), read directly"
_CHK_M3 = (
    "Apple Tech Specs page not retrieved; no verbatim copy found, value as widely reported"
    " (MacRumors/Gigazine coverage of the M3 spec pages)"
)
_CHK_M3U = (
    "819GB/s as quoted from Apple's Mac Studio specs by Macworld and TechPowerUp; the"
    " newsroom URL is written from the release title, not fetched"
)
_CHK_M5 = (
    "153GB/s as quoted from the newsroom release by several outlets (the-decoder.com,"
    " bgr.com); the URL is written from the release title, not fetched"
)


@dataclass(frozen=True)
class SpecEntry:
    pattern: str
    label: str
    memory_bandwidth_bytes_per_s: float | None
    compute_flops: float | None
    source: str
    checked: str


SPEC_TABLE: tuple[SpecEntry, ...] = (
    # NVIDIA data centre (name as NVML reports it, e.g. "NVIDIA H100 80GB HBM3").
    # \b keeps GH200/GH100 superchips (different memory) out of the H200/H100 rows.
    SpecEntry(r"\bH200 NVL", "H200 NVL", 4.8 * _TB, 835.5 * _TFLOPS, _H200, _CHK_H200),
    SpecEntry(r"\bH200\b", "H200 SXM", 4.8 * _TB, 989.5 * _TFLOPS, _H200, _CHK_H200),
    SpecEntry(r"\bH100 NVL", "H100 NVL", 3.9 * _TB, 835.5 * _TFLOPS, _H100, _CHK_H100),
    SpecEntry(r"\bH100 PCIe", "H100 PCIe", 2.0 * _TB, 756.5 * _TFLOPS, _H100, _CHK_H100),
    SpecEntry(r"\bH100\b", "H100 SXM", 3.35 * _TB, 989.5 * _TFLOPS, _H100, _CHK_H100),
    SpecEntry(
        r"A100.*(PCIE.*80GB|80GB.*PCIe)",
        "A100 80GB PCIe",
        1.935 * _TB,
        312 * _TFLOPS,
        _A100,
        _CHK_A100,
    ),
    SpecEntry(r"A100.*80GB", "A100 80GB SXM", 2.039 * _TB, 312 * _TFLOPS, _A100, _CHK_A100),
    SpecEntry(r"A100", "A100 40GB", 1.555 * _TB, 312 * _TFLOPS, _A100, _CHK_A100),
    SpecEntry(r"L40S", "L40S", 864 * _GB, 362.05 * _TFLOPS, _L40S, _CHK_L40),
    SpecEntry(r"\bL40\b", "L40", 864 * _GB, 181.05 * _TFLOPS, _L40, _CHK_L40),
    SpecEntry(r"\bL4\b", "L4", 300 * _GB, 121.0 * _TFLOPS, _L4, _CHK_L4),
    SpecEntry(r"\bA10\b", "A10", 600 * _GB, 125 * _TFLOPS, _A10, _CHK_A10),
    SpecEntry(r"\bT4\b", "T4", 320 * _GB, 65 * _TFLOPS, _T4, _CHK_T4),
    # "Tesla V100-PCIE-32GB", "Tesla V100-SXM2-16GB"; V100S (faster HBM2), FHHL and SXM3
    # differ and are measured.
    SpecEntry(r"V100[- ]PCIE", "V100 PCIe", 900 * _GB, 112 * _TFLOPS, _V100, _CHK_V100),
    SpecEntry(r"V100[- ]SXM2", "V100 SXM2", 900 * _GB, 125 * _TFLOPS, _V100, _CHK_V100),
    # NVIDIA GeForce: end-anchored, so "RTX 4090 D", "RTX 4080 SUPER", "RTX 3080 Ti" and
    # "... Laptop GPU" (different memory and clocks) are measured, not mislabelled.
    # The 12GB RTX 3080 (912GB/s) likely reports the same name as the 10GB one; it then
    # gets the 10GB card's (lower) figure.
    SpecEntry(r"RTX 4090\s*$", "GeForce RTX 4090", 1008 * _GB, 165.2 * _TFLOPS, _ADA, _CHK_ADA),
    SpecEntry(r"RTX 4080\s*$", "GeForce RTX 4080", 716.8 * _GB, 97.5 * _TFLOPS, _ADA, _CHK_ADA),
    SpecEntry(r"RTX 3090\s*$", "GeForce RTX 3090", 936 * _GB, 71 * _TFLOPS, _GA102, _CHK_GA102),
    SpecEntry(r"RTX 3080\s*$", "GeForce RTX 3080", 760 * _GB, 59.5 * _TFLOPS, _GA102, _CHK_GA102),
    # Apple silicon (Metal's device name, e.g. "Apple M2 Max"): unified memory bandwidth;
    # the highest-binned variant where Apple says "up to" (M3 Max 300 vs 400, M4 Max 410 vs
    # 546). Plain "Apple M1" is absent: Apple published no bandwidth for it.
    SpecEntry(r"Apple M1 Ultra", "Apple M1 Ultra", 800 * _GB, None, _M1U, _CHK_APPLE_PR),
    SpecEntry(r"Apple M1 Max", "Apple M1 Max", 400 * _GB, None, _M1PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M1 Pro", "Apple M1 Pro", 200 * _GB, None, _M1PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M2 Ultra", "Apple M2 Ultra", 800 * _GB, None, _M2U, _CHK_APPLE_PR),
    SpecEntry(r"Apple M2 Max", "Apple M2 Max", 400 * _GB, None, _M2PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M2 Pro", "Apple M2 Pro", 200 * _GB, None, _M2PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M2\s*$", "Apple M2", 100 * _GB, None, _M2, _CHK_APPLE_PR),
    SpecEntry(r"Apple M3 Ultra", "Apple M3 Ultra", 819 * _GB, None, _M3U, _CHK_M3U),
    SpecEntry(r"Apple M3 Max", "Apple M3 Max", 400 * _GB, None, _M3PM, _CHK_M3PM),
    SpecEntry(r"Apple M3 Pro", "Apple M3 Pro", 150 * _GB, None, _M3PM, _CHK_M3PM),
    SpecEntry(r"Apple M3\s*$", "Apple M3", 100 * _GB, None, _M3, _CHK_M3),
    SpecEntry(r"Apple M4 Max", "Apple M4 Max", 546 * _GB, None, _M4PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M4 Pro", "Apple M4 Pro", 273 * _GB, None, _M4PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M4\s*$", "Apple M4", 120 * _GB, None, _M4PM, _CHK_APPLE_PR),
    SpecEntry(r"Apple M5\s*$", "Apple M5", 153 * _GB, None, _M5, _CHK_M5),
)

_COMPILED = tuple((re.compile(e.pattern, re.IGNORECASE), e) for e in SPEC_TABLE)


def lookup(name: str) -> SpecEntry | None:
    for pattern, entry in _COMPILED:
        if pattern.search(name):
            return entry
    return None
