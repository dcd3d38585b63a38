"""What devices this machine has (static facts) and how each is doing (live figures).

Three sources, each optional except the CPU: NVIDIA GPUs through NVML, an Apple GPU through
MLX's Metal backend (macOS only), and the host CPU with its RAM through psutil. Each device
is rated (memory bandwidth, compute throughput) from the spec table, or by the
micro-benchmark when the table lacks the figure or `profile` is asked.
"""

import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import psutil
from loguru import logger

from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, PerfFigure
from exo.worker.cpu_features import cpu_flags, kernels_for
from exo.worker.telemetry.nvml import Nvml, NvmlError, NvmlStatic
from exo.worker.telemetry.profiler import Benchmark, Measurement
from exo.worker.telemetry.specs import lookup

UNKNOWN = PerfFigure(value=0.0, source="unknown", detail="")
HOST_POOL = "host"


class DeviceSource(Protocol):
    def probe(self) -> list[DeviceSpec]:
        """Static facts; figures may be `unknown` (the inventory rates them)."""
        ...

    def sample(self) -> dict[str, DeviceMetrics]:
        """Live figures keyed by device id; a failing device reads as a status, never raises."""
        ...

    def close(self) -> None: ...


# --- CPU -------------------------------------------------------------------------------


def cpu_name() -> str:
    if sys.platform == "linux":
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "cpu"


class CpuSource:
    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter: the next call is since now

    def probe(self) -> list[DeviceSpec]:
        return [
            DeviceSpec(
                device_id="cpu",
                kind="cpu",
                name=cpu_name(),
                index=0,
                memory_total_bytes=psutil.virtual_memory().total,
                memory_pool=HOST_POOL,
                memory_bandwidth=UNKNOWN,
                compute=UNKNOWN,
                cores=psutil.cpu_count(logical=True) or 1,
                cpu_kernels=kernels_for(cpu_flags()),
            )
        ]

    def sample(self) -> dict[str, DeviceMetrics]:
        vm = psutil.virtual_memory()
        return {
            "cpu": DeviceMetrics(
                memory_used_bytes=max(0, vm.total - vm.available),
                memory_free_bytes=vm.available,
                utilization_pct=min(100.0, max(0.0, psutil.cpu_percent(interval=None))),
            )
        }

    def close(self) -> None:
        pass


# --- NVIDIA ----------------------------------------------------------------------------


class NvidiaSource:
    """Every NVIDIA GPU NVML sees. Absent NVML: no devices and one info line, never an error."""

    def __init__(self, load: Callable[[], Nvml] = Nvml.load) -> None:
        self._load = load
        self._nvml: Nvml | None = None
        self._statics: list[NvmlStatic] = []
        self._driver: str | None = None
        self._unavailable_logged = False
        # Set when a GPU was lost: the next probe initialises NVML afresh (driver reset).
        self._reinit = False

    def _open(self) -> Nvml | None:
        if self._nvml is not None and not self._reinit:
            return self._nvml
        if self._nvml is not None:
            self._nvml.shutdown()
            self._nvml = None
        try:
            nvml = self._load()
            nvml.init()
        except NvmlError as exc:
            if not self._unavailable_logged:
                logger.info(f"no NVIDIA devices: {exc}")
                self._unavailable_logged = True
            return None
        self._nvml = nvml
        self._reinit = False
        self._driver = nvml.driver_version()
        return nvml

    def probe(self) -> list[DeviceSpec]:
        nvml = self._open()
        if nvml is not None:
            try:
                statics: list[NvmlStatic] = []
                for index in range(nvml.device_count()):
                    try:
                        statics.append(nvml.static(index))
                    except NvmlError as exc:
                        if exc.lost:
                            raise
                        logger.warning(f"NVIDIA device {index} skipped: {exc}")
                self._statics = statics
            except NvmlError as exc:
                logger.warning(f"NVML enumeration failed; keeping the last device list: {exc}")
                self._reinit = True
        return [self._spec(s) for s in self._statics]

    def _spec(self, s: NvmlStatic) -> DeviceSpec:
        return DeviceSpec(
            device_id=f"cuda:{s.index}",
            kind="cuda",
            name=s.name,
            index=s.index,
            uuid=s.uuid,
            memory_total_bytes=s.memory_total_bytes,
            memory_pool=f"cuda:{s.uuid}",
            memory_bandwidth=UNKNOWN,
            compute=UNKNOWN,
            cores=s.cores,
            compute_capability=s.compute_capability,
            pcie_max_generation=s.pcie_max_generation,
            pcie_max_width=s.pcie_max_width,
            power_limit_w=s.power_limit_w,
            max_sm_clock_mhz=s.max_sm_clock_mhz,
            driver_version=self._driver,
        )

    def sample(self) -> dict[str, DeviceMetrics]:
        out: dict[str, DeviceMetrics] = {}
        for s in self._statics:
            out[f"cuda:{s.index}"] = self._sample_one(s.index)
        return out

    def _sample_one(self, index: int) -> DeviceMetrics:
        if self._nvml is None:
            return DeviceMetrics(status="lost", status_detail="NVML is not initialised")
        try:
            r = self._nvml.sample(index)
        except NvmlError as exc:
            if exc.lost:
                self._reinit = True
            return DeviceMetrics(status="lost" if exc.lost else "error", status_detail=str(exc))
        return DeviceMetrics(
            memory_used_bytes=r.memory_used_bytes,
            memory_free_bytes=r.memory_free_bytes,
            utilization_pct=r.utilization_pct,
            temperature_c=r.temperature_c,
            power_w=r.power_w,
            sm_clock_mhz=r.sm_clock_mhz,
            pcie_generation=r.pcie_generation,
            pcie_width=r.pcie_width,
        )

    @property
    def needs_reprobe(self) -> bool:
        return self._reinit

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.shutdown()
            self._nvml = None


# --- Apple -----------------------------------------------------------------------------


class MetalSource:
    """The Apple GPU, through MLX (macOS only). It shares the host's unified memory."""

    def __init__(self) -> None:
        self._working_set: int | None = None

    def probe(self) -> list[DeviceSpec]:
        if sys.platform != "darwin":
            return []
        try:
            import mlx.core as mx

            if not mx.metal.is_available():
                return []
            info = mx.device_info(mx.gpu)
        except Exception as exc:
            logger.info(f"no Metal device: {exc}")
            return []
        name = str(info.get("device_name", "Apple GPU"))
        total = int(info.get("memory_size") or psutil.virtual_memory().total)
        working_set = info.get("max_recommended_working_set_size")
        self._working_set = int(working_set) if working_set else None
        return [
            DeviceSpec(
                device_id="metal:0",
                kind="metal",
                name=name,
                index=0,
                memory_total_bytes=total,
                memory_pool=HOST_POOL,
                memory_bandwidth=UNKNOWN,
                compute=UNKNOWN,
            )
        ]

    def sample(self) -> dict[str, DeviceMetrics]:
        if self._working_set is None and sys.platform != "darwin":
            return {}
        vm = psutil.virtual_memory()
        free = vm.available if self._working_set is None else min(vm.available, self._working_set)
        return {
            "metal:0": DeviceMetrics(
                memory_used_bytes=max(0, vm.total - vm.available), memory_free_bytes=free
            )
        }

    def close(self) -> None:
        pass


# --- the inventory ---------------------------------------------------------------------


def default_sources() -> list[DeviceSource]:
    sources: list[DeviceSource] = [CpuSource(), NvidiaSource()]
    if sys.platform == "darwin":
        sources.append(MetalSource())
    return sources


class Inventory:
    def __init__(
        self, sources: Sequence[DeviceSource], benchmark: Benchmark | None, *, profile: bool = False
    ) -> None:
        self._sources = list(sources)
        self._benchmark = benchmark
        self._profile = profile
        # Measured once per (device id, name) for the life of the process.
        self._measured: dict[tuple[str, str], Measurement | None] = {}

    @property
    def needs_reprobe(self) -> bool:
        return any(getattr(s, "needs_reprobe", False) for s in self._sources)

    def probe(self) -> tuple[DeviceSpec, ...]:
        devices: list[DeviceSpec] = []
        for source in self._sources:
            try:
                devices.extend(source.probe())
            except Exception:
                logger.exception(f"device probe of {type(source).__name__} failed")
        return tuple(self._rate(d) for d in devices)

    def sample(self) -> dict[str, DeviceMetrics]:
        out: dict[str, DeviceMetrics] = {}
        for source in self._sources:
            try:
                out.update(source.sample())
            except Exception:
                logger.exception(f"device sample of {type(source).__name__} failed")
        return out

    def close(self) -> None:
        for source in self._sources:
            source.close()

    def _rate(self, device: DeviceSpec) -> DeviceSpec:
        entry = lookup(device.name)
        bandwidth = compute = UNKNOWN
        if entry is not None:
            cite = f"{entry.label}: {entry.source}"
            if entry.memory_bandwidth_bytes_per_s is not None:
                bandwidth = PerfFigure(
                    value=entry.memory_bandwidth_bytes_per_s, source="spec_table", detail=cite
                )
            if entry.compute_flops is not None:
                compute = PerfFigure(value=entry.compute_flops, source="spec_table", detail=cite)
        if self._profile or bandwidth.source == "unknown" or compute.source == "unknown":
            measured = self._measure(device)
            if measured is not None:
                if self._profile or bandwidth.source == "unknown":
                    bandwidth = PerfFigure(
                        value=measured.memory_bandwidth_bytes_per_s,
                        source="measured",
                        detail=measured.bandwidth_detail,
                    )
                if self._profile or compute.source == "unknown":
                    compute = PerfFigure(
                        value=measured.compute_flops,
                        source="measured",
                        detail=measured.compute_detail,
                    )
        return device.model_copy(update={"memory_bandwidth": bandwidth, "compute": compute})

    def _measure(self, device: DeviceSpec) -> Measurement | None:
        if self._benchmark is None:
            return None
        key = (device.device_id, device.name)
        if key not in self._measured:
            try:
                self._measured[key] = self._benchmark.measure(device)
            except Exception as exc:
                logger.warning(
                    f"micro-benchmark of {device.device_id} ({device.name}) failed: {exc}"
                )
                self._measured[key] = None
        return self._measured[key]
