"""Real device, link and model figures for the placement scenarios, each with its source.

Bandwidth and compute are vendor peak figures (dense 16-bit tensor throughput, no sparsity);
the cost model scales them by its efficiency factors. Free memory is the card's memory
less ~1 GiB that drivers, desktops or the OS already hold.

| device | memory | bandwidth | dense fp16/bf16 | source |
|---|---|---|---|---|
| NVIDIA H100 SXM5 80GB | 80 GB | 3.35 TB/s | 989 TFLOPS | nvidia.com/en-us/data-center/h100 (datasheet) |
| NVIDIA A100 SXM4 80GB | 80 GB | 2.039 TB/s | 312 TFLOPS | nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf |
| NVIDIA A100 PCIe 40GB | 40 GB | 1.555 TB/s | 312 TFLOPS | same A100 datasheet |
| NVIDIA L40S | 48 GB | 864 GB/s | 362 TFLOPS | nvidia.com/en-us/data-center/l40s (datasheet) |
| NVIDIA RTX 4090 | 24 GB | 1008 GB/s | 165 TFLOPS (fp32 acc.) | Ada Lovelace architecture whitepaper v2.1, appendix A |
| NVIDIA RTX 3090 | 24 GB | 936 GB/s | 71 TFLOPS (fp32 acc.) | Ampere GA102 whitepaper v2.1, table 9 |
| NVIDIA A10 | 24 GB | 600 GB/s | 125 TFLOPS | nvidia.com/en-us/data-center/products/a10-gpu (datasheet) |
| NVIDIA T4 | 16 GB | 320 GB/s | 65 TFLOPS | nvidia.com/en-us/data-center/tesla-t4 (datasheet) |
| Apple M2 Ultra (76-core GPU) | 192 GB | 800 GB/s | 27.2 TFLOPS | apple.com/newsroom/2023/06/apple-introduces-m2-ultra |
| Apple M4 Pro (20-core GPU) | 64 GB | 273 GB/s | 9.2 TFLOPS | apple.com/newsroom/2024/10 (M4 Pro and M4 Max); TFLOPS from 20 cores x 128 ALU x 2 x 1.8 GHz |
| AMD Ryzen 9 7950X (CPU) | 64 GB DDR5 | 83.2 GB/s | 2.3 TFLOPS fp32 | 2 ch x DDR5-5200 x 8 B; 16 cores x 4.5 GHz x 32 FLOP/cycle (AVX-512, amd.com product page) |
| AMD EPYC 9654 (CPU) | 384 GB DDR5 | 460.8 GB/s | 7.4 TFLOPS fp32 | 12 ch x DDR5-4800 x 8 B (amd.com); 96 cores x 2.4 GHz x 32 FLOP/cycle |

| link | bandwidth | one-way latency | source |
|---|---|---|---|
| 1 GbE | 125 MB/s | 150 us | IEEE 802.3ab line rate; latency: typical TCP small-message RTT/2 through a switch |
| 10 GbE | 1.25 GB/s | 50 us | IEEE 802.3ae line rate; same latency basis |
| Thunderbolt 4 (IP) | 5 GB/s | 30 us | Intel Thunderbolt 4 spec, 40 Gb/s |
| 100 GbE / IB HDR100 | 12.5 GB/s | 5 us | IEEE 802.3ba line rate; RDMA-class latency |

| model | layers | hidden | vocab | per-layer params | source |
|---|---|---|---|---|---|
| Llama 3.1 8B | 32 | 4096 | 128256 | 218.1 M | meta-llama/Llama-3.1-8B config.json (intermediate 14336, 8 KV heads) |
| Qwen2.5 32B | 64 | 5120 | 152064 | 487.6 M | Qwen/Qwen2.5-32B config.json (intermediate 27648, 8 KV heads) |
| Llama 3.1 70B | 80 | 8192 | 128256 | 855.6 M | meta-llama/Llama-3.1-70B config.json (intermediate 28672, 8 KV heads) |
| Llama 3.1 405B | 126 | 16384 | 128256 | 3187.7 M | meta-llama/Llama-3.1-405B config.json (intermediate 53248, 8 KV heads) |

Per-layer params = 4 attention projections (q, o: hidden^2; k, v: hidden x 8 x 128) + 3 MLP
matrices (hidden x intermediate); q4_k is 4.5 bits per weight (144 bytes per 256).
"""

from exo.shared.types.ids import ModelId, NodeId
from exo.shared.types.models import ModelCard
from exo.shared.types.topology import DeviceId, DeviceKind, DeviceProfile, LinkProfile

GB = 10**9
GIB = 1 << 30

# name: (kind, memory bytes, bandwidth bytes/s, flops)
DEVICES: dict[str, tuple[DeviceKind, int, float, float]] = {
    "H100": ("cuda", 80 * GB, 3.35e12, 989e12),
    "A100-80": ("cuda", 80 * GB, 2.039e12, 312e12),
    "A100-40": ("cuda", 40 * GB, 1.555e12, 312e12),
    "L40S": ("cuda", 48 * GB, 864e9, 362e12),
    "RTX4090": ("cuda", 24 * GB, 1008e9, 165e12),
    "RTX3090": ("cuda", 24 * GB, 936e9, 71e12),
    "A10": ("cuda", 24 * GB, 600e9, 125e12),
    "T4": ("cuda", 16 * GB, 320e9, 65e12),
    "M2Ultra": ("metal", 192 * GB, 800e9, 27.2e12),
    "M4Pro": ("metal", 64 * GB, 273e9, 9.2e12),
    "Ryzen7950X": ("cpu", 64 * GB, 83.2e9, 2.3e12),
    "EPYC9654": ("cpu", 384 * GB, 460.8e9, 7.4e12),
}

# name: (bandwidth bytes/s, one-way latency s)
LINKS: dict[str, tuple[float, float]] = {
    "1GbE": (125e6, 150e-6),
    "10GbE": (1.25e9, 50e-6),
    "TB4": (5e9, 30e-6),
    "100GbE": (12.5e9, 5e-6),
}


def device(node: str, index: int, name: str) -> DeviceProfile:
    kind, memory, bandwidth, flops = DEVICES[name]
    # Apple's OS keeps ~25 % of unified memory from the GPU by default; others ~1 GiB.
    free = int(memory * 0.75) if kind == "metal" else memory - GIB
    return DeviceProfile(
        device_id=DeviceId(f"{node}/{kind}:{index}"),
        node_id=NodeId(node),
        name=name,
        kind=kind,
        memory_free_bytes=free,
        memory_bandwidth_bytes_per_s=bandwidth,
        compute_flops=flops,
    )


def mesh(nodes: list[str], link: str) -> tuple[LinkProfile, ...]:
    bandwidth, latency = LINKS[link]
    return tuple(
        LinkProfile(
            src=NodeId(a), dst=NodeId(b), latency_s=latency, bandwidth_bytes_per_s=bandwidth
        )
        for i, a in enumerate(nodes)
        for b in nodes[i + 1 :]
    )


def _card(
    name: str, layers: int, hidden: int, vocab: int, layer_params: float, dtype: str, bpp: float
) -> ModelCard:
    return ModelCard(
        model_id=ModelId(name),
        display_name=name,
        architecture="llama",
        n_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        context_length=131072,
        dtype=dtype,
        bytes_per_layer=int(layer_params * bpp),
        # Untied embedding and output head.
        bytes_non_layer=int(2 * vocab * hidden * bpp),
        # 8 KV heads x 128 dims x (K and V) x 2 bytes (f16 cache).
        kv_bytes_per_token_per_layer=8 * 128 * 2 * 2,
        kv_dtype="float16",
        source="bench",
    )


MODELS: dict[str, ModelCard] = {
    "llama-8b-bf16": _card("llama-3.1-8b", 32, 4096, 128256, 218.1e6, "bfloat16", 2.0),
    "qwen-32b-q4": _card("qwen2.5-32b", 64, 5120, 152064, 487.6e6, "q4_k", 144 / 256),
    "llama-70b-q4": _card("llama-3.1-70b", 80, 8192, 128256, 855.6e6, "q4_k", 144 / 256),
    "llama-70b-bf16": _card("llama-3.1-70b", 80, 8192, 128256, 855.6e6, "bfloat16", 2.0),
    "llama-405b-bf16": _card("llama-3.1-405b", 126, 16384, 128256, 3187.7e6, "bfloat16", 2.0),
}
