"""NVIDIA inventory and metrics through the NVML adapter, against a FAKE NVML module.

THE FAKE BELOW IS A STAND-IN FOR HARDWARE THIS MACHINE LACKS (no NVIDIA GPU, no driver).
It mimics the slice of `pynvml` the adapter calls: same function names, same return shapes
(memory/utilisation structs with attributes, milliwatts, MHz), and the same error shape (an
exception carrying NVML's numeric return code in `.value`). The figures are typical of what
`nvidia-smi` prints for an H100 SXM5 80GB and a GeForce RTX 4090, transcribed by hand, not
captured on hardware in this session. `test_telemetry_hardware.py` runs the real thing when
NVML is present.
"""

from dataclasses import dataclass, field
from types import SimpleNamespace

import anyio
import pytest
from loguru import logger

from exo.shared.types.events import DeviceInventoryReported, DeviceMetricsReported, Event
from exo.shared.types.ids import NodeId
from exo.shared.types.telemetry import DeviceSpec
from exo.worker.telemetry.inventory import CpuSource, Inventory, NvidiaSource
from exo.worker.telemetry.loop import Telemetry
from exo.worker.telemetry.nvml import Nvml, NvmlError
from exo.worker.telemetry.policy import TelemetryPolicy
from exo.worker.telemetry.profiler import Measurement

NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_GPU_IS_LOST = 15
_MIB = 1 << 20


class FakeNVMLError(Exception):
    """Shaped like `pynvml.NVMLError`: the NVML return code is in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return f"fake NVML error {self.value}"


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str
    total: int
    used: int
    util: int
    temp: int
    power_mw: int
    limit_mw: int
    cc: tuple[int, int]
    sm_mhz: int
    max_sm_mhz: int
    pcie: tuple[int, int]
    max_pcie: tuple[int, int]
    cores: int
    # NVML function name -> return code it fails with.
    fail: dict[str, int] = field(default_factory=dict[str, int])


def h100() -> FakeGpu:
    # nvidia-smi on an idle H100 SXM5: 81559 MiB total, 700 W limit, PCIe Gen5 x16.
    return FakeGpu(
        name="NVIDIA H100 80GB HBM3",
        uuid="GPU-6e1f0f6c-0d0a-4c43-9bb8-000000000001",
        total=81559 * _MIB,
        used=4 * _MIB,
        util=0,
        temp=31,
        power_mw=71_000,
        limit_mw=700_000,
        cc=(9, 0),
        sm_mhz=345,
        max_sm_mhz=1980,
        pcie=(5, 16),
        max_pcie=(5, 16),
        cores=16896,
    )


def rtx4090() -> FakeGpu:
    # nvidia-smi on an idle GeForce RTX 4090: 24564 MiB, 450 W limit, PCIe Gen4 x16 (Gen1 idle).
    # Older pynvml returned names as bytes; this one does, to exercise the decoding.
    return FakeGpu(
        name=b"NVIDIA GeForce RTX 4090",
        uuid="GPU-2b7c8f1a-7f4e-4d2b-8a55-000000000002",
        total=24564 * _MIB,
        used=310 * _MIB,
        util=3,
        temp=38,
        power_mw=21_500,
        limit_mw=450_000,
        cc=(8, 9),
        sm_mhz=210,
        max_sm_mhz=3120,
        pcie=(1, 16),
        max_pcie=(4, 16),
        cores=16384,
    )


class FakeNvml:
    """FAKE `pynvml` module (stand-in for NVIDIA hardware + driver; see the module docstring)."""

    NVMLError = FakeNVMLError
    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.inits = 0
        self.initialised = False

    def _gpu(self, handle: int, fn: str) -> FakeGpu:
        if not self.initialised:
            raise FakeNVMLError(1)  # NVML_ERROR_UNINITIALIZED
        gpu = self.gpus[handle]
        if fn in gpu.fail:
            raise FakeNVMLError(gpu.fail[fn])
        if "*" in gpu.fail:
            raise FakeNVMLError(gpu.fail["*"])
        return gpu

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.inits += 1
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._gpu(index, "nvmlDeviceGetHandleByIndex")
        return index

    def nvmlDeviceGetName(self, h: int) -> str | bytes:
        return self._gpu(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._gpu(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, h: int) -> SimpleNamespace:
        g = self._gpu(h, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=g.total, used=g.used, free=g.total - g.used)

    def nvmlDeviceGetCudaComputeCapability(self, h: int) -> tuple[int, int]:
        return self._gpu(h, "nvmlDeviceGetCudaComputeCapability").cc

    def nvmlDeviceGetEnforcedPowerLimit(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetEnforcedPowerLimit").limit_mw

    def nvmlDeviceGetMaxClockInfo(self, h: int, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return self._gpu(h, "nvmlDeviceGetMaxClockInfo").max_sm_mhz

    def nvmlDeviceGetMaxPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetMaxPcieLinkGeneration").max_pcie[0]

    def nvmlDeviceGetMaxPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetMaxPcieLinkWidth").max_pcie[1]

    def nvmlDeviceGetNumGpuCores(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetNumGpuCores").cores

    def nvmlDeviceGetUtilizationRates(self, h: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._gpu(h, "nvmlDeviceGetUtilizationRates").util, memory=0)

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._gpu(h, "nvmlDeviceGetTemperature").temp

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return self._gpu(h, "nvmlDeviceGetClockInfo").sm_mhz

    def nvmlDeviceGetCurrPcieLinkGeneration(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetCurrPcieLinkGeneration").pcie[0]

    def nvmlDeviceGetCurrPcieLinkWidth(self, h: int) -> int:
        return self._gpu(h, "nvmlDeviceGetCurrPcieLinkWidth").pcie[1]


class FixedBenchmark:
    """Stands in for the micro-benchmark (the real one is exercised by the CLI test)."""

    def __init__(self) -> None:
        self.measured: list[str] = []

    def measure(self, device: DeviceSpec) -> Measurement | None:
        self.measured.append(device.device_id)
        return Measurement(1e11, "fake copy", 2e13, "fake matmul")


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def emit(self, event: Event) -> int:
        self.events.append(event)
        return len(self.events) - 1


def _inventory(fake: FakeNvml, *, profile: bool = False) -> tuple[Inventory, FixedBenchmark]:
    bench = FixedBenchmark()
    source = NvidiaSource(lambda: Nvml(fake))
    return Inventory([source], bench, profile=profile), bench


def test_two_gpu_models_inventory_contents() -> None:
    inventory, bench = _inventory(FakeNvml([h100(), rtx4090()]))
    a, b = inventory.probe()
    assert (a.device_id, a.kind, a.name, a.index) == ("cuda:0", "cuda", "NVIDIA H100 80GB HBM3", 0)
    assert a.uuid == "GPU-6e1f0f6c-0d0a-4c43-9bb8-000000000001"
    assert a.memory_total_bytes == 81559 * _MIB
    assert a.memory_pool == f"cuda:{a.uuid}"
    assert (a.compute_capability, a.pcie_max_generation, a.pcie_max_width) == ("9.0", 5, 16)
    assert (a.power_limit_w, a.max_sm_clock_mhz, a.cores) == (700.0, 1980, 16896)
    assert a.driver_version == "550.54.15"
    assert a.memory_bandwidth.source == "spec_table" and a.memory_bandwidth.value == 3.35e12
    assert a.compute.source == "spec_table" and a.compute.value == pytest.approx(989.5e12)
    assert "nvidia.com" in a.memory_bandwidth.detail
    assert b.name == "NVIDIA GeForce RTX 4090"  # decoded from bytes
    assert (b.compute_capability, b.pcie_max_generation, b.power_limit_w) == ("8.9", 4, 450.0)
    assert b.memory_bandwidth.value == pytest.approx(1008e9)
    assert bench.measured == []  # both are in the spec table: nothing measured


def test_metrics_contents_and_unsupported_readings() -> None:
    gpu = rtx4090()
    gpu.fail["nvmlDeviceGetPowerUsage"] = NVML_ERROR_NOT_SUPPORTED
    inventory, _ = _inventory(FakeNvml([h100(), gpu]))
    inventory.probe()
    metrics = inventory.sample()
    a, b = metrics["cuda:0"], metrics["cuda:1"]
    assert a.status == "ok"
    assert (a.memory_used_bytes, a.memory_free_bytes) == (4 * _MIB, 81555 * _MIB)
    assert (a.utilization_pct, a.temperature_c, a.power_w) == (0.0, 31.0, 71.0)
    assert (a.sm_clock_mhz, a.pcie_generation, a.pcie_width) == (345, 5, 16)
    assert b.status == "ok" and b.power_w is None  # not supported: absent, not an error
    assert (b.utilization_pct, b.pcie_generation) == (3.0, 1)


def test_unknown_gpu_and_profile_are_measured() -> None:
    odd = h100()
    odd.name = "NVIDIA Mystery Accelerator"
    inventory, bench = _inventory(FakeNvml([odd, h100()]))
    unknown, known = inventory.probe()
    assert unknown.memory_bandwidth.source == "measured" and unknown.compute.source == "measured"
    assert unknown.compute.detail == "fake matmul"
    assert known.memory_bandwidth.source == "spec_table"
    assert bench.measured == ["cuda:0"]
    inventory.probe()
    assert bench.measured == ["cuda:0"]  # measured once per process

    profiled, bench = _inventory(FakeNvml([h100()]), profile=True)
    (device,) = profiled.probe()
    assert device.memory_bandwidth.source == "measured" and bench.measured == ["cuda:0"]


def test_no_nvml_means_cpu_only_with_one_info_line() -> None:
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    try:
        fake = FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
        inventory = Inventory([CpuSource(), NvidiaSource(lambda: Nvml(fake))], FixedBenchmark())
        devices, metrics = inventory.probe(), inventory.sample()
        for _ in range(2):
            devices = inventory.probe()
            metrics = inventory.sample()
    finally:
        logger.remove(sink_id)
    assert [d.kind for d in devices] == ["cpu"]
    assert list(metrics) == ["cpu"]
    nvidia_lines = [line for line in lines if "NVIDIA" in line]
    assert len(nvidia_lines) == 1, lines


def test_load_without_driver_raises_typed_error() -> None:
    # The real pynvml on this machine: the package is installed, the driver library is not.
    nvml = Nvml.load()
    error: NvmlError | None = None
    try:
        nvml.init()
        nvml.shutdown()  # a machine with a driver: nothing more to check here
    except NvmlError as exc:
        error = exc
    assert error is None or (not error.lost and error.code == NVML_ERROR_LIBRARY_NOT_FOUND)


def test_gpu_lost_mid_run_is_a_status_change_then_recovers() -> None:
    fake = FakeNvml([h100(), rtx4090()])
    inventory, _ = _inventory(fake)
    sink = Sink()
    now = [0.0]
    policy = TelemetryPolicy(reprobe_lost_s=30.0)
    telemetry = Telemetry(
        node_id=NodeId("node-a"),
        emitter=sink,
        inventory=inventory,
        policy=policy,
        clock=lambda: now[0],
        wall_ms=lambda: int(now[0] * 1000),
    )

    async def scenario() -> None:
        await telemetry._probe(force_emit=True)  # pyright: ignore[reportPrivateUsage]
        await telemetry.tick()
        # Use up the burst so that only the reserved token is left.
        for _ in range(10):
            now[0] += policy.interval_s
            fake.gpus[0].used += 4 << 30
            await telemetry.tick()
        emitted = len(sink.events)
        fake.gpus[1].fail["*"] = NVML_ERROR_GPU_IS_LOST  # the driver loses the 4090
        now[0] += policy.interval_s
        await telemetry.tick()
        assert len(sink.events) == emitted + 1
        lost = sink.events[-1]
        assert isinstance(lost, DeviceMetricsReported)
        assert lost.metrics["cuda:1"].status == "lost"
        assert lost.metrics["cuda:0"].status == "ok"
        # Back after a driver reset: re-initialised within reprobe_lost_s.
        del fake.gpus[1].fail["*"]
        for _ in range(int(policy.reprobe_lost_s / policy.interval_s) + 1):
            now[0] += policy.interval_s
            await telemetry.tick()
        assert fake.inits >= 2
        statuses = [
            e.metrics["cuda:1"].status for e in sink.events if isinstance(e, DeviceMetricsReported)
        ]
        assert statuses[-1] == "ok"

    anyio.run(scenario)
    kinds = [type(e) for e in sink.events]
    assert kinds[0] is DeviceInventoryReported
    assert (
        kinds.count(DeviceInventoryReported) == 1
    )  # same devices after the reset: no new inventory
