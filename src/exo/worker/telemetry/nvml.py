"""A small typed adapter over NVML (`pynvml` from `nvidia-ml-py`): the only file that touches it.

Everything NVML returns is turned into plain typed values here; every NVML error becomes an
`NvmlError` that says whether the GPU is gone (`lost`) or the reading merely failed. Readings
a GPU does not support (power on some boards, PCIe on SXM parts) come back as `None`.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# NVML return codes (nvml.h; the same numbers as pynvml's NVML_ERROR_* constants).
_ERROR_UNINITIALIZED = 1
_ERROR_DRIVER_NOT_LOADED = 9
_ERROR_GPU_IS_LOST = 15
_ERROR_RESET_REQUIRED = 16
_ERROR_LIB_RM_VERSION_MISMATCH = 18
_ERROR_GPU_NOT_FOUND = 28
# After one of these the device handle is useless until the driver is back and NVML is
# initialised again.
LOST_CODES = frozenset(
    {
        _ERROR_UNINITIALIZED,
        _ERROR_DRIVER_NOT_LOADED,
        _ERROR_GPU_IS_LOST,
        _ERROR_RESET_REQUIRED,
        _ERROR_LIB_RM_VERSION_MISMATCH,
        _ERROR_GPU_NOT_FOUND,
    }
)

# pynvml constants (nvml.h): sensor and clock selectors.
_TEMPERATURE_GPU = 0
_CLOCK_SM = 1


class NvmlError(Exception):
    def __init__(self, message: str, *, code: int | None, lost: bool) -> None:
        super().__init__(message)
        self.code = code
        self.lost = lost


@dataclass(frozen=True)
class NvmlStatic:
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    compute_capability: str | None
    pcie_max_generation: int | None
    pcie_max_width: int | None
    power_limit_w: float | None
    max_sm_clock_mhz: int | None
    cores: int | None


@dataclass(frozen=True)
class NvmlSample:
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_pct: float | None
    temperature_c: float | None
    power_w: float | None
    sm_clock_mhz: int | None
    pcie_generation: int | None
    pcie_width: int | None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


class Nvml:
    """NVML behind typed methods. `module` is `pynvml` (or a test's stand-in with its names)."""

    def __init__(self, module: Any) -> None:
        self._m = module
        self._error_type: type[BaseException] = module.NVMLError

    @classmethod
    def load(cls) -> "Nvml":
        """The real NVML; raises `NvmlError` when the package or the driver library is absent."""
        try:
            import pynvml  # pyright: ignore[reportMissingTypeStubs]
        except ImportError as exc:
            raise NvmlError(f"nvidia-ml-py is not installed: {exc}", code=None, lost=False) from exc
        return cls(pynvml)

    def _convert(self, exc: BaseException) -> NvmlError:
        code = getattr(exc, "value", None)
        code = code if isinstance(code, int) else None
        return NvmlError(f"NVML: {exc}", code=code, lost=code in LOST_CODES)

    def _call(self, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except Exception as exc:
            if isinstance(exc, self._error_type):
                raise self._convert(exc) from exc
            raise

    def _optional(self, fn: Callable[[], T]) -> T | None:
        """A reading the device may not support: None then; a lost GPU still raises."""
        try:
            return self._call(fn)
        except NvmlError as exc:
            if exc.lost:
                raise
            return None

    def init(self) -> None:
        self._call(lambda: self._m.nvmlInit())

    def shutdown(self) -> None:
        try:
            self._call(lambda: self._m.nvmlShutdown())
        except NvmlError:
            pass

    def driver_version(self) -> str | None:
        value = self._optional(lambda: self._m.nvmlSystemGetDriverVersion())
        return None if value is None else _text(value)

    def device_count(self) -> int:
        return int(self._call(lambda: self._m.nvmlDeviceGetCount()))

    def _handle(self, index: int) -> Any:
        return self._call(lambda: self._m.nvmlDeviceGetHandleByIndex(index))

    def static(self, index: int) -> NvmlStatic:
        m = self._m
        h = self._handle(index)
        memory = self._call(lambda: m.nvmlDeviceGetMemoryInfo(h))
        cc = self._optional(lambda: m.nvmlDeviceGetCudaComputeCapability(h))
        limit_mw = self._optional(lambda: m.nvmlDeviceGetEnforcedPowerLimit(h))
        max_sm = self._optional(
            lambda: m.nvmlDeviceGetMaxClockInfo(h, getattr(m, "NVML_CLOCK_SM", _CLOCK_SM))
        )
        gen = self._optional(lambda: m.nvmlDeviceGetMaxPcieLinkGeneration(h))
        width = self._optional(lambda: m.nvmlDeviceGetMaxPcieLinkWidth(h))
        cores = self._optional(lambda: m.nvmlDeviceGetNumGpuCores(h))
        return NvmlStatic(
            index=index,
            name=_text(self._call(lambda: m.nvmlDeviceGetName(h))),
            uuid=_text(self._call(lambda: m.nvmlDeviceGetUUID(h))),
            memory_total_bytes=int(memory.total),
            compute_capability=None if cc is None else f"{int(cc[0])}.{int(cc[1])}",
            pcie_max_generation=_positive(gen),
            pcie_max_width=_positive(width),
            power_limit_w=None if limit_mw is None else float(limit_mw) / 1000.0,
            max_sm_clock_mhz=None if max_sm is None else int(max_sm),
            cores=_positive(cores),
        )

    def sample(self, index: int) -> NvmlSample:
        m = self._m
        h = self._handle(index)
        memory = self._call(lambda: m.nvmlDeviceGetMemoryInfo(h))
        util = self._optional(lambda: m.nvmlDeviceGetUtilizationRates(h))
        temp = self._optional(
            lambda: m.nvmlDeviceGetTemperature(
                h, getattr(m, "NVML_TEMPERATURE_GPU", _TEMPERATURE_GPU)
            )
        )
        power_mw = self._optional(lambda: m.nvmlDeviceGetPowerUsage(h))
        sm = self._optional(
            lambda: m.nvmlDeviceGetClockInfo(h, getattr(m, "NVML_CLOCK_SM", _CLOCK_SM))
        )
        gen = self._optional(lambda: m.nvmlDeviceGetCurrPcieLinkGeneration(h))
        width = self._optional(lambda: m.nvmlDeviceGetCurrPcieLinkWidth(h))
        return NvmlSample(
            memory_used_bytes=int(memory.used),
            memory_free_bytes=int(memory.free),
            utilization_pct=None if util is None else min(100.0, max(0.0, float(util.gpu))),
            temperature_c=None if temp is None else float(temp),
            power_w=None if power_mw is None else float(power_mw) / 1000.0,
            sm_clock_mhz=None if sm is None else int(sm),
            pcie_generation=None if gen is None else int(gen),
            pcie_width=None if width is None else int(width),
        )


def _positive(value: Any) -> int | None:
    if value is None:
        return None
    number = int(value)
    return number if number > 0 else None
