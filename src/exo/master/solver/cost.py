"""The cost model: per-device layer times, memory caps and hand-off times, compiled once.

Decode is memory-bound: a stage reads its layers' weights and KV cache once per token, at
the share of the device's bandwidth its engine reaches, plus the engine's fixed costs.
Every formula is written down in docs/placement.md; the solver, the heuristics and the
predictions all read the same compiled `Problem`, so they can never disagree.
"""

import itertools
import re

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.engines import EngineName
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import EngineEfficiency, PlacementRequest, engine_for
from exo.shared.types.topology import ClusterView, DeviceKind, DeviceProfile

# Bytes per weight of common storage formats (block formats include their scales).
_BYTES_PER_PARAM: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "q8_0": 34 / 32,
    "q4_0": 18 / 32,
    "q4_1": 20 / 32,
    "q4_affine_g32": 20 / 32,
    "q4_affine_g64": 36 / 64,
    "q4_k": 144 / 256,
}

DEFAULT_CONTEXT = 4096

# An ordered pipeline: (index into Problem.devices, number of layers) per stage.
Split = tuple[tuple[int, int], ...]


# MLX's affine quantization: `bits`-bit values, a 16-bit scale and bias per `group` weights.
_AFFINE = re.compile(r"q(\d)_affine_g(\d+)")


def _affine(dtype: str) -> tuple[int, int] | None:
    match = _AFFINE.fullmatch(dtype.lower())
    return (int(match[1]), int(match[2])) if match else None


def bytes_per_param(dtype: str) -> float:
    affine = _affine(dtype)
    if affine is not None:
        bits, group = affine
        return bits / 8 + 4 / group
    # Unknown formats count as 16-bit: that over-counts nothing but compute.
    return _BYTES_PER_PARAM.get(dtype.lower(), 2.0)


_KV_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class Holding(Frozen):
    """What a stage's engine keeps in a device's memory, per layer and for the embedding
    and head, which need not be what the checkpoint stores (`holding`)."""

    # e.g. "as stored", "bfloat16", "8-bit (stored 3-bit)"
    weights: str
    bytes_per_param: float = Field(gt=0)
    layer_bytes: int = Field(ge=0)
    non_layer_bytes: int = Field(ge=0)
    kv_bytes_per_token_per_layer: int = Field(gt=0)


def holding(card: ModelCard, engine: EngineName, kind: DeviceKind) -> Holding:
    """How `engine` holds `card`'s model on a device of `kind` (docs/placement.md, "Memory"):

    - MLX: the checkpoint as stored, 16-bit KV cache.
    - torch on CUDA: every weight dequantized to bfloat16 (its CUDA format), bf16 KV.
    - torch on CPU: 4- and 8-bit weights as stored (our kernels take them as they are);
      2-, 3-, 5- and 6-bit ones as 8-bit; dense checkpoints quantized to 4-bit in groups of
      32; the KV cache in float32 (the CPU's activation dtype).

    The embedding and head scale like the layers, never below what is stored (a dense
    checkpoint's table is held in float32 on CPU). `$EXO_TORCH_WEIGHTS` on a node
    overrides its format; placement does not see that.
    """
    stored = bytes_per_param(card.dtype)
    if engine == "mlx":
        return Holding(
            weights="as stored",
            bytes_per_param=stored,
            layer_bytes=card.bytes_per_layer,
            non_layer_bytes=card.bytes_non_layer,
            kv_bytes_per_token_per_layer=card.kv_bytes_per_token_per_layer,
        )
    table = 1.0  # the embedding and head against the layers' factor (dense on CPU: more)
    if kind == "cpu":
        affine = _affine(card.dtype)
        if affine is not None and affine[0] in (4, 8):
            held, weights = stored, "as stored"
        elif affine is not None:
            held, weights = 1 + 4 / affine[1], f"8-bit (stored {affine[0]}-bit)"
        elif card.dtype.lower() in _BYTES_PER_PARAM and stored < 2.0:
            held, weights = stored, "as stored"  # GGUF blocks, int8, fp8: already small
        else:
            held, weights = bytes_per_param("q4_affine_g32"), f"4-bit (stored {card.dtype})"
            table = 4.0 / stored  # the dense embedding is held in float32, the CPU's dtype
        kv_element = 4  # float32, the CPU's activation dtype
    else:
        held, weights = 2.0, "bfloat16" if card.dtype.lower() != "bfloat16" else "as stored"
        kv_element = 2
    kv_stored = _KV_BYTES.get(card.kv_dtype.lower(), 2)
    kv_held = card.kv_bytes_per_token_per_layer * kv_element // kv_stored
    ratio = held / stored
    return Holding(
        weights=weights,
        bytes_per_param=held,
        layer_bytes=round(card.bytes_per_layer * ratio),
        non_layer_bytes=round(card.bytes_non_layer * max(ratio, table, 1.0)),
        kv_bytes_per_token_per_layer=max(1, kv_held),
    )


def activation_bytes(card: ModelCard) -> int:
    """One token's hidden state on the wire: 16-bit activations unless the model is float32."""
    return card.hidden_size * (4 if card.dtype.lower() == "float32" else 2)


def context_length(card: ModelCard, request: PlacementRequest) -> int:
    if request.context_length is not None:
        return request.context_length
    return min(card.context_length, DEFAULT_CONTEXT)


class DeviceTerms(Frozen):
    """What one eligible device costs per layer and how many layers it can hold."""

    device: DeviceProfile
    engine: EngineName
    # How the engine holds the weights here, and the bytes that takes (`holding`); KV at
    # the problem's context.
    weights: str
    layer_bytes: int = Field(ge=0)
    kv_bytes_per_layer: int = Field(ge=0)
    non_layer_bytes: int = Field(ge=0)
    layer_decode_s: float
    head_decode_s: float
    layer_prefill_s: float
    # Paid once per token by every stage on the device, whatever its layer count.
    stage_overhead_s: float
    usable_bytes: int
    overhead_bytes: int
    max_layers_middle: int = Field(ge=0)
    # When it also holds the embedding / output head (first or last stage).
    max_layers_end: int = Field(ge=0)


class Problem(Frozen):
    """A placement problem with every cost already computed; indices refer to `devices`."""

    card: ModelCard
    request: PlacementRequest
    context_length: int
    devices: tuple[DeviceTerms, ...]
    # [i][j]: activation hand-off i -> j (None: no link between their nodes).
    handoff_s: tuple[tuple[float | None, ...], ...]
    handoff_prefill_s: tuple[tuple[float | None, ...], ...]
    # [i][j]: the sampled token's trip from the last stage i back to the first stage j.
    return_s: tuple[tuple[float | None, ...], ...]
    # [i][j]: how long one token's activation occupies the path i -> j.
    occupancy_s: tuple[tuple[float | None, ...], ...]

    @property
    def n_layers(self) -> int:
        return self.card.n_layers

    def local(self, i: int, j: int) -> bool:
        return self.devices[i].device.node_id == self.devices[j].device.node_id


def _prefill_roofline(
    read_bytes: float, flops: float, device: DeviceProfile, bandwidth: float, fraction: float
) -> float:
    return max(read_bytes / bandwidth, flops / (device.compute_flops * fraction))


def efficiency_of(device: DeviceProfile, request: PlacementRequest) -> EngineEfficiency:
    # Devices the named engine cannot run on never reach the solver (select_devices); the
    # fallback only costs the hypothetical devices of explanations, for their memory caps.
    engine = engine_for(device.kind, request) or request.engine or request.cpu_engine
    return request.params.efficiency(engine, device.kind, device.cpu_kernels)


def device_terms(
    card: ModelCard, device: DeviceProfile, request: PlacementRequest, ctx: int
) -> DeviceTerms:
    params = request.params
    eff = efficiency_of(device, request)
    held = holding(card, eff.engine, device.kind)
    kv_per_layer = held.kv_bytes_per_token_per_layer * ctx
    per_layer = held.layer_bytes + kv_per_layer
    usable = int(device.memory_free_bytes * (1.0 - params.memory_margin))
    overhead = params.overhead_bytes(device.kind, eff.engine)
    room = usable - overhead
    middle = max(0, min(card.n_layers, room // per_layer))
    end = max(0, min(card.n_layers, (room - held.non_layer_bytes) // per_layer))
    bandwidth = device.memory_bandwidth_bytes_per_s * eff.bandwidth_fraction
    layer_flops = 2.0 * card.bytes_per_layer / bytes_per_param(card.dtype)
    # The output head is the embedding matrix (tied) or a same-sized one: never more than
    # all non-layer bytes.
    head_bytes = min(
        held.non_layer_bytes, card.vocab_size * card.hidden_size * held.bytes_per_param
    )
    prompt = request.reference_prompt_tokens
    # Decoding at the reference position reads that many tokens of KV cache per layer.
    decode_read = held.layer_bytes + held.kv_bytes_per_token_per_layer * prompt
    # Decode has no compute term: one token is a matrix-vector product (~3 flops per weight
    # byte at 4 bits), memory-bound on every device, and the engine's measured fraction
    # already holds whatever else slows it. Prefill is batched matmuls: the roofline.
    compute_fraction = eff.compute_fraction or params.compute_efficiency
    prefill = _prefill_roofline(
        held.layer_bytes, layer_flops * prompt, device, bandwidth, compute_fraction
    )
    return DeviceTerms(
        device=device,
        engine=eff.engine,
        weights=held.weights,
        layer_bytes=held.layer_bytes,
        kv_bytes_per_layer=kv_per_layer,
        non_layer_bytes=held.non_layer_bytes,
        layer_decode_s=decode_read / bandwidth + eff.layer_overhead_s,
        head_decode_s=head_bytes / bandwidth,
        layer_prefill_s=prefill + eff.layer_overhead_s,
        stage_overhead_s=eff.token_overhead_s,
        usable_bytes=usable,
        overhead_bytes=overhead,
        max_layers_middle=middle,
        max_layers_end=end,
    )


def compile_problem(
    card: ModelCard,
    cluster: ClusterView,
    devices: tuple[DeviceProfile, ...],
    request: PlacementRequest,
) -> Problem:
    ctx = context_length(card, request)
    params = request.params
    act = activation_bytes(card)
    prompt_act = act * request.reference_prompt_tokens
    n = len(devices)
    # Reverse first, so that a link given for the exact direction wins.
    links = {(lk.dst, lk.src): lk for lk in cluster.links} | {
        (lk.src, lk.dst): lk for lk in cluster.links
    }
    handoff: list[list[float | None]] = [[None] * n for _ in range(n)]
    prefill: list[list[float | None]] = [[None] * n for _ in range(n)]
    back: list[list[float | None]] = [[None] * n for _ in range(n)]
    busy: list[list[float | None]] = [[None] * n for _ in range(n)]
    for i, a in enumerate(devices):
        for j, b in enumerate(devices):
            if i == j:
                # One stage: no hand-off, and the token never leaves the device.
                back[i][j] = 0.0
                continue
            if a.node_id == b.node_id:
                latency, bandwidth = params.local_latency_s, params.local_bandwidth_bytes_per_s
            else:
                link = links.get((a.node_id, b.node_id))
                if link is None:
                    continue
                # A network hop also pays the device-to-host and host-to-device copies.
                latency = params.local_latency_s + link.latency_s
                bandwidth = min(link.bandwidth_bytes_per_s, params.local_bandwidth_bytes_per_s)
            handoff[i][j] = latency + act / bandwidth
            prefill[i][j] = latency + prompt_act / bandwidth
            back[i][j] = latency + params.token_frame_bytes / bandwidth
            busy[i][j] = act / bandwidth
    return Problem(
        card=card,
        request=request,
        context_length=ctx,
        devices=tuple(device_terms(card, d, request, ctx) for d in devices),
        handoff_s=tuple(tuple(r) for r in handoff),
        handoff_prefill_s=tuple(tuple(r) for r in prefill),
        return_s=tuple(tuple(r) for r in back),
        occupancy_s=tuple(tuple(r) for r in busy),
    )


def stage_decode_s(problem: Problem, device: int, layers: int, last: bool) -> float:
    terms = problem.devices[device]
    head = terms.head_decode_s if last else 0.0
    return terms.stage_overhead_s + layers * terms.layer_decode_s + head


def stage_prefill_s(problem: Problem, device: int, layers: int, last: bool) -> float:
    terms = problem.devices[device]
    head = terms.head_decode_s if last else 0.0
    return terms.stage_overhead_s + layers * terms.layer_prefill_s + head


def max_layers(problem: Problem, device: int, end: bool) -> int:
    terms = problem.devices[device]
    return terms.max_layers_end if end else terms.max_layers_middle


def routable(problem: Problem, split: Split) -> bool:
    """Every hand-off and the token's return have a link."""
    order = [d for d, _ in split]
    hops = all(problem.handoff_s[a][b] is not None for a, b in itertools.pairwise(order))
    return hops and problem.return_s[order[-1]][order[0]] is not None


def fits(problem: Problem, split: Split) -> bool:
    """Valid: all layers once, each stage non-empty, within memory, on distinct linked devices."""
    if not split or sum(n for _, n in split) != problem.n_layers:
        return False
    if len({d for d, _ in split}) != len(split):
        return False
    last = len(split) - 1
    for k, (d, n) in enumerate(split):
        if n < 1 or n > max_layers(problem, d, end=k in (0, last)):
            return False
    return routable(problem, split)


def latency_s(problem: Problem, split: Split) -> float:
    """Single-stream time per token: stages + hand-offs + the token's return trip."""
    last = len(split) - 1
    total = sum(stage_decode_s(problem, d, n, k == last) for k, (d, n) in enumerate(split))
    for (a, _), (b, _) in itertools.pairwise(split):
        total += _known(problem.handoff_s[a][b])
    return total + _known(problem.return_s[split[-1][0]][split[0][0]])


def bottleneck_s(problem: Problem, split: Split) -> float:
    """With many streams in flight, one token per this interval: the busiest stage or link."""
    last = len(split) - 1
    busiest = max(stage_decode_s(problem, d, n, k == last) for k, (d, n) in enumerate(split))
    links = [_known(problem.occupancy_s[a][b]) for (a, _), (b, _) in itertools.pairwise(split)]
    return max([busiest, *links])


def objective_s(problem: Problem, split: Split) -> tuple[float, float]:
    """The request's objective first, the other as tie-break: smaller is better."""
    lat, neck = latency_s(problem, split), bottleneck_s(problem, split)
    return (lat, neck) if problem.request.objective == "latency" else (neck, lat)


def ttft_s(problem: Problem, split: Split) -> float:
    """Reference prompt through every stage in turn, then the first token's return."""
    last = len(split) - 1
    total = sum(stage_prefill_s(problem, d, n, k == last) for k, (d, n) in enumerate(split))
    for (a, _), (b, _) in itertools.pairwise(split):
        total += _known(problem.handoff_prefill_s[a][b])
    return total + _known(problem.return_s[split[-1][0]][split[0][0]])


def _known(value: float | None) -> float:
    if value is None:
        raise ValueError("split uses a hop with no link; check routable() first")
    return value
