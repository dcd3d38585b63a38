"""The spec table: real driver name strings map to the right row, variants that differ fall
through to measurement, and every row is cited.

Names are as the drivers print them: NVML's `nvmlDeviceGetName` (what `nvidia-smi -L`
shows) and MLX's `mx.metal.device_info()["device_name"]` on Apple silicon.
"""

import pytest

from exo.worker.telemetry.specs import SPEC_TABLE, lookup


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("NVIDIA A100 80GB PCIe", "A100 80GB PCIe"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA L40", "L40"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA A10", "A10"),
        ("Tesla T4", "T4"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-SXM2-32GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
        ("NVIDIA GeForce RTX 4090", "GeForce RTX 4090"),
        ("NVIDIA GeForce RTX 4080", "GeForce RTX 4080"),
        ("NVIDIA GeForce RTX 3090", "GeForce RTX 3090"),
        ("NVIDIA GeForce RTX 3080", "GeForce RTX 3080"),
        ("Apple M1 Pro", "Apple M1 Pro"),
        ("Apple M1 Max", "Apple M1 Max"),
        ("Apple M1 Ultra", "Apple M1 Ultra"),
        ("Apple M2", "Apple M2"),
        ("Apple M2 Pro", "Apple M2 Pro"),
        ("Apple M2 Max", "Apple M2 Max"),
        ("Apple M2 Ultra", "Apple M2 Ultra"),
        ("Apple M3", "Apple M3"),
        ("Apple M3 Pro", "Apple M3 Pro"),
        ("Apple M3 Max", "Apple M3 Max"),
        ("Apple M3 Ultra", "Apple M3 Ultra"),
        ("Apple M4", "Apple M4"),
        ("Apple M4 Pro", "Apple M4 Pro"),
        ("Apple M4 Max", "Apple M4 Max"),
        ("Apple M5", "Apple M5"),
    ],
)
def test_real_device_names_match_their_row(name: str, label: str) -> None:
    entry = lookup(name)
    assert entry is not None, name
    assert entry.label == label


@pytest.mark.parametrize(
    "name",
    [
        "NVIDIA GH200 480GB",  # Grace Hopper: not an H200 (96GB HBM3 / 144GB HBM3e variants)
        "Tesla V100S-PCIE-32GB",  # faster memory and clocks: not the V100 PCIe row
        "Tesla V100-FHHL-16GB",
        "NVIDIA A10G",  # AWS part, different tensor throughput from the A10
        "NVIDIA GeForce RTX 4090 D",
        "NVIDIA GeForce RTX 4080 SUPER",
        "NVIDIA GeForce RTX 3080 Ti",
        "NVIDIA GeForce RTX 3090 Ti",
        "NVIDIA GeForce RTX 4090 Laptop GPU",
        "Apple M1",  # Apple published no bandwidth for the base M1
        "Apple M4 Ultra",  # not a base M4
        "Apple M5 Pro",
        "AMD EPYC 7763 64-Core Processor",
        "NVIDIA Mystery Accelerator",
    ],
)
def test_variants_with_other_figures_are_left_to_measurement(name: str) -> None:
    assert lookup(name) is None


def test_figures_of_note() -> None:
    h100 = lookup("NVIDIA H100 80GB HBM3")
    assert h100 is not None
    assert (h100.memory_bandwidth_bytes_per_s, h100.compute_flops) == (3.35e12, 989.5e12)
    m3u = lookup("Apple M3 Ultra")
    assert m3u is not None and m3u.memory_bandwidth_bytes_per_s == 819e9
    assert m3u.compute_flops is None  # Apple publishes no matmul throughput: measured
    rtx = lookup("NVIDIA GeForce RTX 4090")
    assert rtx is not None and rtx.compute_flops == pytest.approx(165.2e12)


def test_every_row_is_cited_and_says_how_it_was_checked() -> None:
    labels = [e.label for e in SPEC_TABLE]
    assert len(labels) == len(set(labels))
    for entry in SPEC_TABLE:
        assert entry.source.strip() and entry.checked.strip(), entry.label
        assert "apple.com" in entry.source or "nvidia.com" in entry.source, entry.label
        assert entry.memory_bandwidth_bytes_per_s is not None, entry.label
        # Plausible magnitudes: 50 GB/s .. 10 TB/s, 10 .. 5000 dense TFLOPS.
        assert 50e9 <= entry.memory_bandwidth_bytes_per_s <= 10e12, entry.label
        if entry.compute_flops is not None:
            assert 10e12 <= entry.compute_flops <= 5000e12, entry.label


def test_each_row_is_reachable() -> None:
    """No row is shadowed by an earlier, more generic pattern: its own label finds it."""
    for entry in SPEC_TABLE:
        name = entry.label if entry.label.startswith("Apple") else f"NVIDIA {entry.label}"
        if entry.label == "A100 80GB PCIe":
            name = "NVIDIA A100 80GB PCIe"
        elif entry.label == "A100 80GB SXM":
            name = "NVIDIA A100-SXM4-80GB"
        elif entry.label.endswith("SXM"):
            name = f"NVIDIA {entry.label.removesuffix(' SXM')}"
        elif entry.label.startswith("V100"):
            name = f"Tesla {entry.label.replace(' ', '-').upper()}-32GB"
        found = lookup(name)
        assert found is entry, (name, found)
