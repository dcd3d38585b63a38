"""Change detection and rate limiting: what an idle, a changing and a busy node write."""

import random
from collections.abc import Callable

import pytest

from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, PerfFigure
from exo.worker.telemetry.policy import (
    ChangeLimiter,
    TelemetryPolicy,
    change_reason,
    events_per_hour,
)

_GIB = 1 << 30
_FIG = PerfFigure(value=1e12, source="spec_table", detail="t")
GPU = DeviceSpec(
    device_id="cuda:0",
    kind="cuda",
    name="NVIDIA H100 80GB HBM3",
    index=0,
    memory_total_bytes=80 * _GIB,
    memory_pool="cuda:x",
    memory_bandwidth=_FIG,
    compute=_FIG,
    power_limit_w=700.0,
)
DEVICES = {"cuda:0": GPU}


def metrics(
    free_gib: float = 70.0, util: float = 0.0, temp: float = 30.0, power: float = 70.0
) -> dict[str, DeviceMetrics]:
    free = int(free_gib * _GIB)
    return {
        "cuda:0": DeviceMetrics(
            memory_used_bytes=80 * _GIB - free,
            memory_free_bytes=free,
            utilization_pct=util,
            temperature_c=temp,
            power_w=power,
        )
    }


def idle_noise(rng: random.Random) -> dict[str, DeviceMetrics]:
    """What an idle GPU's readings do: jitter well below every threshold."""
    return metrics(
        free_gib=70.0 + rng.uniform(-0.05, 0.05),
        util=rng.choice([0.0, 0.0, 1.0, 3.0]),
        temp=30.0 + rng.uniform(-2, 2),
        power=70.0 + rng.uniform(-10, 10),
    )


def test_change_reason_thresholds() -> None:
    p = TelemetryPolicy()
    base = metrics()["cuda:0"]
    same = metrics(free_gib=70.2, util=5.0, temp=33.0, power=100.0)["cuda:0"]
    assert change_reason(GPU, base, same, p) is None
    assert change_reason(GPU, base, metrics(free_gib=68.0)["cuda:0"], p) == "memory"
    assert change_reason(GPU, base, metrics(util=60.0)["cuda:0"], p) == "utilization"
    assert change_reason(GPU, base, metrics(temp=45.0)["cuda:0"], p) == "temperature"
    assert change_reason(GPU, base, metrics(power=300.0)["cuda:0"], p) == "power"
    lost = DeviceMetrics(status="lost", status_detail="gone")
    assert change_reason(GPU, base, lost, p) == "status ok -> lost"
    assert change_reason(GPU, None, base, p) == "new device"


def simulate(
    policy: TelemetryPolicy, hours: float, sample: Callable[[int], dict[str, DeviceMetrics]]
) -> list[float]:
    limiter = ChangeLimiter(policy)
    emitted: list[float] = []
    steps = int(hours * 3600 / policy.interval_s)
    for i in range(steps):
        now = i * policy.interval_s
        if limiter.offer(now, DEVICES, sample(i)) is not None:
            emitted.append(now)
    return emitted


def test_idle_node_hour_stays_far_under_100_events() -> None:
    rng = random.Random(7)
    policy = TelemetryPolicy()
    emitted = simulate(policy, 1.0, lambda _: idle_noise(rng))
    # The first sample plus one heartbeat per heartbeat_s.
    assert emitted == [0.0, 900.0, 1800.0, 2700.0]
    assert events_per_hour(policy, idle=True) == 4.0
    # Three idle nodes for a day: well under 100 per node-hour.
    day = simulate(policy, 24.0, lambda _: idle_noise(rng))
    assert len(day) / 24.0 < 5


def test_change_after_quiet_shows_within_one_interval() -> None:
    rng = random.Random(1)
    policy = TelemetryPolicy()
    change_at = 4000  # samples; long after the start, mid-quiet

    def sample(i: int) -> dict[str, DeviceMetrics]:
        return metrics(free_gib=40.0) if i >= change_at else idle_noise(rng)

    emitted = simulate(policy, 6.0, sample)
    change_time = change_at * policy.interval_s
    after = [t for t in emitted if t >= change_time]
    assert after[0] - change_time <= policy.interval_s


def test_constant_change_is_bounded_by_the_bucket() -> None:
    policy = TelemetryPolicy()
    emitted = simulate(policy, 3.0, lambda i: metrics(free_gib=10.0 + (i % 2) * 20.0))
    per_hour = [sum(1 for t in emitted if h * 3600 <= t < (h + 1) * 3600) for h in range(3)]
    assert per_hour[0] <= policy.burst + policy.refill_per_hour
    assert all(n <= policy.refill_per_hour + 1 for n in per_hour[1:])
    assert max(per_hour) <= events_per_hour(policy, idle=False)


def test_status_change_spends_the_reserved_token() -> None:
    policy = TelemetryPolicy(burst=3, refill_per_hour=0.0)
    limiter = ChangeLimiter(policy)
    assert limiter.offer(0.0, DEVICES, metrics()) == "first sample"
    assert limiter.offer(5.0, DEVICES, metrics(free_gib=10.0)) is not None
    # One token left: an ordinary change must leave it for a status change.
    assert limiter.offer(10.0, DEVICES, metrics(free_gib=60.0)) is None
    lost = {"cuda:0": DeviceMetrics(status="lost", status_detail="gone")}
    assert limiter.offer(15.0, DEVICES, lost) == "cuda:0: status ok -> lost"
    assert limiter.tokens == pytest.approx(0.0)
    assert limiter.offer(20.0, DEVICES, metrics()) is None  # empty bucket: held back
