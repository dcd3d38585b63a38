"""Why a request cannot be placed: which devices are short, by how much, and what would fit."""

import math
from collections.abc import Callable

from exo.master.solver.cost import (
    DeviceTerms,
    Problem,
    Split,
    device_terms,
    max_layers,
    routable,
)
from exo.master.solver.report import memory_use
from exo.shared.types.placement import ClusterChange, DeviceShortfall, ManualStage, PlacementError
from exo.shared.types.topology import DeviceId, DeviceProfile


def excluded(devices: tuple[DeviceProfile, ...], reason: str) -> tuple[DeviceShortfall, ...]:
    return tuple(
        DeviceShortfall(
            device_id=d.device_id,
            free_bytes=d.memory_free_bytes,
            max_layers=0,
            shortfall_bytes=0,
            reason=reason,
        )
        for d in devices
    )


def layer_capacity(mid: list[int], end: list[int]) -> int:
    """Most layers the devices hold together when one or two of them also hold embedding and head."""
    if not mid:
        return 0
    alone = max(end)
    total = sum(mid)
    losses = sorted(m - e for m, e in zip(mid, end, strict=True) if e >= 1)
    pair = total - losses[0] - losses[1] if len(losses) >= 2 else 0
    return max(alone, pair)


def _capacity(problem: Problem) -> int:
    return layer_capacity(
        [t.max_layers_middle for t in problem.devices], [t.max_layers_end for t in problem.devices]
    )


def _fitting_context(problem: Problem) -> int | None:
    """The longest KV context (tokens) at which the layers fit, if any does."""

    def fits_at(ctx: int) -> bool:
        terms = [
            device_terms(problem.card, t.device, problem.request, ctx) for t in problem.devices
        ]
        return (
            layer_capacity([t.max_layers_middle for t in terms], [t.max_layers_end for t in terms])
            >= problem.n_layers
        )

    if not problem.devices or not fits_at(1):
        return None
    lo, hi = 1, problem.context_length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits_at(mid) else (lo, mid - 1)
    return lo


def _smallest_free(
    problem: Problem, caps_with: Callable[[int], tuple[list[int], list[int]]], grown: DeviceTerms
) -> int | None:
    """The fewest free bytes for which `caps_with(bytes)` holds every layer (monotone:
    bisect); `grown` is the device whose free bytes vary, as it holds the model."""
    params = problem.request.params
    whole = (
        problem.n_layers * (grown.layer_bytes + grown.kv_bytes_per_layer) + grown.non_layer_bytes
    )
    hi = math.ceil((whole + grown.overhead_bytes) / (1 - params.memory_margin)) + 1

    def enough(free: int) -> bool:
        mid, end = caps_with(free)
        return layer_capacity(mid, end) >= problem.n_layers

    if not enough(hi):
        return None
    lo = 0
    while lo < hi:
        at = (lo + hi) // 2
        lo, hi = (lo, at) if enough(at) else (at + 1, hi)
    return lo


def _terms_of(problem: Problem, device: DeviceProfile) -> DeviceTerms:
    return device_terms(problem.card, device, problem.request, problem.context_length)


def _caps_of(problem: Problem, device: DeviceProfile) -> tuple[int, int]:
    t = _terms_of(problem, device)
    return t.max_layers_middle, t.max_layers_end


def _new_device(problem: Problem) -> DeviceProfile:
    # A new GPU: torch holds a quantized model's weights in bfloat16 there (~3.6x a 4-bit
    # checkpoint), so the answer covers Metal and most CPUs too. Not every CPU running torch:
    # its KV cache is float32 (twice CUDA's) and its fixed overhead 1 GiB against 768 MiB.
    return problem.devices[0].device.model_copy(update={"kind": "cuda"})


def _with_new_device(problem: Problem) -> Callable[[int], tuple[list[int], list[int]]]:
    mid = [t.max_layers_middle for t in problem.devices]
    end = [t.max_layers_end for t in problem.devices]
    template = _new_device(problem)

    def caps(free: int) -> tuple[list[int], list[int]]:
        m, e = _caps_of(problem, template.model_copy(update={"memory_free_bytes": free}))
        return [*mid, m], [*end, e]

    return caps


def _with_more_on(problem: Problem, d: int) -> Callable[[int], tuple[list[int], list[int]]]:
    mid = [t.max_layers_middle for t in problem.devices]
    end = [t.max_layers_end for t in problem.devices]
    device = problem.devices[d].device

    def caps(extra: int) -> tuple[list[int], list[int]]:
        grown = device.model_copy(update={"memory_free_bytes": device.memory_free_bytes + extra})
        m, e = _caps_of(problem, grown)
        return [*mid[:d], m, *mid[d + 1 :]], [*end[:d], e, *end[d + 1 :]]

    return caps


def infeasible(problem: Problem, left_out: tuple[DeviceShortfall, ...]) -> PlacementError:
    n = problem.n_layers
    if not problem.devices:
        return PlacementError(reason="no eligible device", devices=left_out)
    held = _capacity(problem)
    if held >= n:
        return PlacementError(
            reason="the devices could hold the model but no linked route joins enough of them; "
            "add the missing links between their nodes",
            devices=left_out,
        )
    changes: list[ClusterChange] = []
    more = [
        (x, d)
        for d in range(len(problem.devices))
        if (x := _smallest_free(problem, _with_more_on(problem, d), problem.devices[d])) is not None
    ]
    if more:
        extra, d = min(more)
        where = problem.devices[d].device.device_id
        changes.append(
            ClusterChange(
                kind="free_memory", bytes=extra, description=f"free {extra} more bytes on {where}"
            )
        )
    new_device = _smallest_free(
        problem, _with_new_device(problem), _terms_of(problem, _new_device(problem))
    )
    if new_device is not None:
        changes.append(
            ClusterChange(
                kind="add_device",
                bytes=new_device,
                description=f"add a linked device with at least {new_device} bytes free",
            )
        )
    ctx = _fitting_context(problem)
    if ctx is not None:
        changes.append(
            ClusterChange(
                kind="reduce_context",
                context_length=ctx,
                description=f"reserve KV cache for at most {ctx} tokens instead of {problem.context_length}",
            )
        )
    # What the cluster lacks in usable bytes: the weights, KV and overhead a new device would carry.
    params = problem.request.params
    short = (
        math.floor(new_device * (1 - params.memory_margin)) - params.overhead_cuda_bytes
        if new_device is not None
        else (n - held) * max(t.layer_bytes + t.kv_bytes_per_layer for t in problem.devices)
    )
    total_free = sum(t.device.memory_free_bytes for t in problem.devices)
    shorts = [
        DeviceShortfall(
            device_id=t.device.device_id,
            free_bytes=t.device.memory_free_bytes,
            max_layers=t.max_layers_middle,
            # Each device's part of the missing bytes, in proportion to its free memory.
            shortfall_bytes=-(-short * t.device.memory_free_bytes // max(total_free, 1)),
            reason=(
                f"holds at most {t.max_layers_middle} of {n} layers"
                if t.max_layers_middle
                else f"cannot hold one layer: needs "
                f"{t.layer_bytes + t.kv_bytes_per_layer + t.overhead_bytes} bytes, has "
                f"{t.usable_bytes} usable"
            ),
        )
        for t in problem.devices
    ]
    return PlacementError(
        reason=f"the model does not fit: the eligible devices hold {held} of {n} layers "
        f"at a {problem.context_length}-token context",
        devices=(*shorts, *left_out),
        shortfall_bytes=max(short, 0),
        changes=tuple(changes),
    )


def manual_split(problem: Problem, stages: tuple[ManualStage, ...]) -> Split | PlacementError:
    """Check a pinned split: known devices, contiguous layers, memory and links."""
    index: dict[DeviceId, int] = {t.device.device_id: d for d, t in enumerate(problem.devices)}
    unknown = [s.device_id for s in stages if s.device_id not in index]
    if unknown:
        return PlacementError(reason=f"manual split names devices that are not eligible: {unknown}")
    if len({s.device_id for s in stages}) != len(stages):
        return PlacementError(
            reason="manual split uses a device twice; each stage needs its own device"
        )
    at = 0
    for s in stages:
        if s.start_layer != at or s.end_layer <= s.start_layer:
            return PlacementError(reason=f"manual split is not contiguous at layer {at}")
        at = s.end_layer
    if at != problem.n_layers:
        return PlacementError(reason=f"manual split covers {at} of {problem.n_layers} layers")
    split = tuple((index[s.device_id], s.end_layer - s.start_layer) for s in stages)
    last = len(split) - 1
    shorts: list[DeviceShortfall] = []
    for k, (d, n) in enumerate(split):
        end = k in (0, last)
        if n > max_layers(problem, d, end):
            use = memory_use(problem, d, n, end)
            shorts.append(
                DeviceShortfall(
                    device_id=problem.devices[d].device.device_id,
                    free_bytes=use.free_bytes,
                    max_layers=max_layers(problem, d, end),
                    shortfall_bytes=use.total_bytes - use.usable_bytes,
                    reason=f"{n} layers need {use.total_bytes} bytes, {use.usable_bytes} usable",
                )
            )
    if shorts:
        total = sum(s.shortfall_bytes for s in shorts)
        return PlacementError(
            reason="manual split does not fit in memory",
            devices=tuple(shorts),
            shortfall_bytes=total,
        )
    if not routable(problem, split):
        return PlacementError(reason="manual split hands off between nodes that have no link")
    return split
