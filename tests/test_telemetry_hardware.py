"""The real NVML on real NVIDIA hardware; skips (with the reason printed) where there is none.

Run it on a GPU machine with `uv run pytest -s tests/test_telemetry_hardware.py` and record
its output in docs/telemetry.md.
"""

import time

import pytest

from exo.worker.telemetry.inventory import Inventory, NvidiaSource
from exo.worker.telemetry.nvml import Nvml, NvmlError
from exo.worker.telemetry.profiler import EngineBenchmark


def _nvml_or_skip() -> None:
    try:
        nvml = Nvml.load()
        nvml.init()
    except NvmlError as exc:
        reason = (
            f"no NVML on this machine ({exc}); the fake-NVML tests cover the logic, this one "
            "waits for a machine with an NVIDIA driver"
        )
        print(reason)
        pytest.skip(reason)
    count = nvml.device_count()
    nvml.shutdown()
    if count == 0:
        reason = "NVML present but no NVIDIA devices; this test waits for an NVIDIA GPU"
        print(reason)
        pytest.skip(reason)


def test_real_nvidia_inventory_and_overhead() -> None:
    _nvml_or_skip()
    inventory = Inventory([NvidiaSource()], EngineBenchmark(), profile=True)
    try:
        devices = inventory.probe()
        assert devices
        start, cpu_start = time.perf_counter(), time.process_time()
        samples = 20
        metrics = inventory.sample()
        for _ in range(samples - 1):
            metrics = inventory.sample()
        wall = (time.perf_counter() - start) / samples
        cpu = (time.process_time() - cpu_start) / samples
    finally:
        inventory.close()
    for d in devices:
        m = metrics[d.device_id]
        assert m.status == "ok"
        assert d.memory_total_bytes > 0 and 0 < m.memory_free_bytes <= d.memory_total_bytes
        assert d.uuid is not None and d.uuid.startswith(("GPU-", "MIG-"))
        print(d.model_dump_json(indent=2))
        print(m.model_dump_json(indent=2))
    print(
        f"one NVML sample of {len(devices)} device(s): {wall * 1e3:.2f} ms wall, {cpu * 1e3:.2f} ms CPU"
    )
