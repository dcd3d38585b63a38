"""When a metrics sample is worth an event: change detection plus a token bucket.

A sample becomes an event only when it differs *significantly* from the last one emitted
(thresholds below), and only while the node's token bucket allows. Every figure is
compared with the last *emitted* value, so slow drifts add up and are reported once they
cross a threshold, and a change held back by the bucket goes out (with the newest figures)
as soon as a token is back. A device status change (a GPU lost or back) may spend the last
token; an ordinary change leaves one in reserve for it. With nothing changing, one
heartbeat event per `heartbeat_s` keeps `metrics_at_ms` fresh.

Events per node-hour (see `events_per_hour`): idle = 3600 / heartbeat_s (4 by default);
at most burst + refill_per_hour in any hour however busy (66 by default), plus one inventory
event per start or device change.
"""

from dataclasses import dataclass

from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec

_MIB = 1 << 20


@dataclass(frozen=True)
class TelemetryPolicy:
    # Seconds between samples: a change after a quiet spell shows within one interval.
    interval_s: float = 5.0
    # Memory: a change of max(fraction of the device's total, floor) bytes.
    memory_fraction: float = 0.01
    memory_min_bytes: int = 256 * _MIB
    utilization_points: float = 20.0
    temperature_c: float = 10.0
    # Power: this fraction of the board's limit (or `power_w` when it has none).
    power_fraction: float = 0.25
    power_w: float = 50.0
    # Token bucket over metrics events.
    burst: int = 6
    refill_per_hour: float = 60.0
    heartbeat_s: float = 900.0
    # Devices are enumerated afresh this often (and sooner, every `reprobe_lost_s`, after a
    # GPU was lost) to notice hot-plug and driver resets; an unchanged list emits nothing.
    reprobe_s: float = 300.0
    reprobe_lost_s: float = 30.0


def events_per_hour(policy: TelemetryPolicy, *, idle: bool) -> float:
    """Metrics events one node writes per hour: idle, or the ceiling under constant change."""
    if idle:
        return 3600.0 / policy.heartbeat_s
    return policy.burst + policy.refill_per_hour


def change_reason(
    device: DeviceSpec | None,
    before: DeviceMetrics | None,
    now: DeviceMetrics,
    policy: TelemetryPolicy,
) -> str | None:
    """Why `now` differs significantly from `before` (None: it does not)."""
    if before is None:
        return "new device"
    if now.status != before.status:
        return f"status {before.status} -> {now.status}"
    total = device.memory_total_bytes if device is not None else 0
    memory_step = max(policy.memory_min_bytes, int(policy.memory_fraction * total))
    if abs(now.memory_free_bytes - before.memory_free_bytes) >= memory_step:
        return "memory"
    if _moved(before.utilization_pct, now.utilization_pct, policy.utilization_points):
        return "utilization"
    if _moved(before.temperature_c, now.temperature_c, policy.temperature_c):
        return "temperature"
    limit = device.power_limit_w if device is not None else None
    power_step = policy.power_fraction * limit if limit else policy.power_w
    if _moved(before.power_w, now.power_w, power_step):
        return "power"
    return None


def _moved(before: float | None, now: float | None, step: float) -> bool:
    if (before is None) != (now is None):
        return True
    return before is not None and now is not None and abs(now - before) >= step


class ChangeLimiter:
    """Decides, sample by sample, whether to emit a metrics event. Time is passed in."""

    def __init__(self, policy: TelemetryPolicy) -> None:
        self._policy = policy
        self._tokens = float(policy.burst)
        self._refilled_at: float | None = None
        self._emitted: dict[str, DeviceMetrics] | None = None
        self._emitted_at: float | None = None

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None:
            rate = self._policy.refill_per_hour / 3600.0
            self._tokens = min(
                float(self._policy.burst), self._tokens + (now - self._refilled_at) * rate
            )
        self._refilled_at = now

    def reason(
        self, devices: dict[str, DeviceSpec], metrics: dict[str, DeviceMetrics]
    ) -> tuple[str, bool] | None:
        """(why, is a status change) for a significant difference, status changes first."""
        if self._emitted is None:
            return ("first sample", False)
        if set(metrics) != set(self._emitted):
            return ("devices changed", True)
        ordinary: str | None = None
        for device_id, now in metrics.items():
            before = self._emitted.get(device_id)
            why = change_reason(devices.get(device_id), before, now, self._policy)
            if why is None:
                continue
            if why.startswith("status"):
                return (f"{device_id}: {why}", True)
            ordinary = ordinary or f"{device_id}: {why}"
        return None if ordinary is None else (ordinary, False)

    def offer(
        self, now: float, devices: dict[str, DeviceSpec], metrics: dict[str, DeviceMetrics]
    ) -> str | None:
        """The reason to emit this sample now (and the token is spent), or None."""
        self._refill(now)
        found = self.reason(devices, metrics)
        if found is None:
            if self._emitted_at is not None and now - self._emitted_at >= self._policy.heartbeat_s:
                found = ("heartbeat", False)
            else:
                return None
        why, urgent = found
        # An ordinary change keeps one token in reserve for a device status change.
        needed = 1.0 if urgent else 2.0
        if self._tokens < needed - 1e-9:
            return None
        self._tokens -= 1.0
        self._emitted = dict(metrics)
        self._emitted_at = now
        return why

    @property
    def tokens(self) -> float:
        return self._tokens
