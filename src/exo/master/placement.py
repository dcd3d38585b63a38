"""Where a new instance goes: the CP-SAT solver over the devices and links in the state.

Pure: a function of the model card, the state and the request. `decide` calls
`auto_place` on the master's event loop, so the solver runs under a small wall-clock
limit (`PLACE_TIME_LIMIT_S`); a cluster of a few devices solves in milliseconds.
"""

from typing import Any

from exo.master.solver import place
from exo.shared.topology_from_state import cluster_view
from exo.shared.types.base import Frozen
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.ids import NodeId, RunnerId
from exo.shared.types.instances import (
    EngineName,
    InstancePrediction,
    ShardAssignment,
    StagePrediction,
)
from exo.shared.types.models import ModelCard
from exo.shared.types.placement import ManualStage, Placement, PlacementRequest
from exo.shared.types.placement import PlacementError as SolverError
from exo.shared.types.state import State
from exo.shared.types.topology import ClusterView, DeviceId

# The whole solver call's budget on the master's event loop (CP-SAT gets 85 % of it). With
# up to 16 devices the solver proves its answer optimal in 10-60 ms (docs/placement.md);
# beyond, it returns its best within the limit, never worse than its greedy warm start.
PLACE_TIME_LIMIT_S = 0.5

# PlaceInstance fields that mean the same in a PlacementRequest, taken when the command has
# them (the command type grows them; placement needs no change then).
_REQUEST_FIELDS = {
    "objective",
    "context_length",
    "include_nodes",
    "exclude_nodes",
    "include_devices",
    "exclude_devices",
}


class PlacementError(Frozen):
    reason: str


class AutoPlacement(Frozen):
    shards: tuple[ShardAssignment, ...]
    # None when no node had reported its devices yet (the unpredicted fallback).
    prediction: InstancePrediction | None


def placement_request(command: PlaceInstance, default_engine: EngineName) -> PlacementRequest:
    """The solver's request for a command: its pin, engine and placement options."""
    given: dict[str, Any] = command.model_dump(include=_REQUEST_FIELDS, exclude_none=True)
    if command.node_id is not None:
        given["include_nodes"] = (command.node_id,)
    return PlacementRequest.model_validate(
        {
            **given,
            "engine": command.engine,
            "cpu_engine": command.engine or default_engine,
            "time_limit_s": PLACE_TIME_LIMIT_S,
        }
    )


def auto_place(
    card: ModelCard,
    state: State,
    command: PlaceInstance,
    runner_ids: list[RunnerId],
    default_engine: EngineName,
) -> AutoPlacement | PlacementError:
    """One stage per device of the solver's placement, in pipeline order.

    Devices come from telemetry in the state (`topology_from_state.cluster_view`). When none
    of the allowed up nodes has a usable device yet (telemetry not reported), the model goes
    whole onto the least-loaded of them, unpredicted: a fresh node can serve at once.
    """
    up = sorted(n.node_id for n in state.nodes.values() if n.status == "up")
    if command.node_id is not None and command.node_id not in up:
        return PlacementError(reason=f"node {command.node_id} is not an up member of the cluster")
    allowed = [command.node_id] if command.node_id is not None else up
    if not allowed:
        return PlacementError(reason="no node is up")
    request = placement_request(command, default_engine)
    view = cluster_view(state)
    view = ClusterView(
        devices=tuple(d for d in view.devices if d.node_id in allowed), links=view.links
    )
    if not view.devices:
        return _whole_on_least_loaded(card, state, allowed, runner_ids, request)
    result = place(card, view, request)
    if isinstance(result, SolverError):
        return PlacementError(reason=explain(result))
    if len(result.stages) > len(runner_ids):
        return PlacementError(reason=f"{len(result.stages)} stages but only {len(runner_ids)} ids")
    return AutoPlacement(
        shards=shards_of(result, card, runner_ids), prediction=prediction_of(result)
    )


def cost_manual_split(
    card: ModelCard, state: State, command: PlaceInstance, default_engine: EngineName
) -> InstancePrediction | PlacementError | None:
    """The predicted figures of a user's split (already validated by `manual_split`).

    A `PlacementError` when it does not fit the devices' memory; None when it cannot be
    costed (a device without telemetry yet, two stages on one device, or nodes without a
    measured link): it is placed unpredicted, as the user asked. The cost model rates a
    CPU stage with one engine: the split's, when all its stages share one, else this
    node's default."""
    if not command.stages:
        return None
    view = cluster_view(state)
    stages = tuple(
        ManualStage(
            device_id=DeviceId(f"{s.node_id}/{s.device}"),
            start_layer=s.start_layer,
            end_layer=s.end_layer,
        )
        for s in command.stages
    )
    known = {d.device_id for d in view.devices}
    ids = [s.device_id for s in stages]
    if any(i not in known for i in ids) or len(set(ids)) != len(ids):
        return None
    engines = {s.engine for s in command.stages}
    request = placement_request(
        command.model_copy(update={"node_id": None, "engine": None}), default_engine
    ).model_copy(
        update={
            "manual_split": stages,
            "include_nodes": None,
            "include_devices": None,
            "exclude_nodes": (),
            "exclude_devices": (),
            "cpu_engine": next(iter(engines)) if len(engines) == 1 else default_engine,
        }
    )
    result = place(card, view, request)
    if isinstance(result, SolverError):
        return PlacementError(reason=explain(result)) if result.shortfall_bytes > 0 else None
    return prediction_of(result)


def shards_of(
    placement: Placement, card: ModelCard, runner_ids: list[RunnerId]
) -> tuple[ShardAssignment, ...]:
    return tuple(
        ShardAssignment(
            runner_id=runner_ids[k],
            node_id=stage.node_id,
            device=local_device(stage.node_id, stage.device_id),
            engine=stage.engine,
            start_layer=stage.start_layer,
            end_layer=stage.end_layer,
            n_layers=card.n_layers,
        )
        for k, stage in enumerate(placement.stages)
    )


def local_device(node_id: NodeId, device_id: str) -> str:
    """ "node/cuda:0" -> "cuda:0": the id the node's worker knows its device by."""
    prefix = f"{node_id}/"
    return device_id.removeprefix(prefix)


def prediction_of(placement: Placement) -> InstancePrediction:
    p = placement.prediction
    return InstancePrediction(
        objective=placement.objective,
        solver_status=placement.solver.status,
        solve_time_s=placement.solver.solve_time_s,
        tokens_per_s=p.tokens_per_s,
        time_per_token_s=p.time_per_token_s,
        throughput_tokens_per_s=p.throughput_tokens_per_s,
        ttft_s=p.ttft_s,
        reference_prompt_tokens=p.reference_prompt_tokens,
        context_length=p.context_length,
        stages=tuple(
            StagePrediction(
                device_id=s.device_id,
                decode_s=s.decode_time_s,
                prefill_s=s.prefill_time_s,
                handoff_s=s.handoff_s,
            )
            for s in placement.stages
        ),
    )


def explain(error: SolverError) -> str:
    """The solver's reason, which devices are short by how many bytes, and the least change."""
    parts = [error.reason]
    short = [d for d in error.devices if d.shortfall_bytes > 0]
    if short:
        parts.append(
            "short: "
            + ", ".join(f"{d.device_id} by {d.shortfall_bytes} bytes ({d.reason})" for d in short)
        )
    others = [d for d in error.devices if d.shortfall_bytes <= 0]
    if others:
        parts.append("; ".join(f"{d.device_id}: {d.reason}" for d in others))
    if error.changes:
        parts.append("smallest change: " + error.changes[0].description)
    return "; ".join(parts)


def _whole_on_least_loaded(
    card: ModelCard,
    state: State,
    nodes: list[NodeId],
    runner_ids: list[RunnerId],
    request: PlacementRequest,
) -> AutoPlacement:
    load = {n: 0 for n in nodes}
    for instance in state.instances.values():
        for shard in instance.shards:
            if shard.node_id in load:
                load[shard.node_id] += 1
    node = min(nodes, key=lambda n: (load[n], n))
    shard = ShardAssignment(
        runner_id=runner_ids[0],
        node_id=node,
        device="cpu",
        engine=request.cpu_engine,
        start_layer=0,
        end_layer=card.n_layers,
        n_layers=card.n_layers,
    )
    return AutoPlacement(shards=(shard,), prediction=None)
