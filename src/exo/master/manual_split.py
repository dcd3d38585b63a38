"""A user-pinned pipeline split, checked before it becomes an instance.

Pure: a function of the model card, the state and the requested stages. Every way a
split can be wrong has its own code, and the message names the offending stage.
"""

from collections.abc import Sequence
from typing import Literal, get_args

from exo.shared.types.base import Frozen
from exo.shared.types.commands import PinnedStage
from exo.shared.types.ids import RunnerId
from exo.shared.types.instances import EngineName, ShardAssignment
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State

# The most stages one instance may have (each is a runner process with its own link).
MAX_STAGES = 32

SplitErrorCode = Literal[
    "no_stages",
    "too_many_stages",
    "empty_range",
    "not_contiguous",
    "incomplete",
    "beyond_model",
    "unknown_node",
    "node_down",
    "unknown_device",
    "unknown_engine",
]

ENGINES: tuple[str, ...] = get_args(EngineName)


class SplitRejected(Frozen):
    code: SplitErrorCode
    message: str
    # Index of the offending stage in the request, when one stage is at fault.
    stage: int | None = None

    def describe(self) -> str:
        return f"{self.code}: {self.message}"


def validate_manual_split(
    card: ModelCard,
    state: State,
    stages: Sequence[PinnedStage],
    runner_ids: Sequence[RunnerId],
) -> tuple[ShardAssignment, ...] | SplitRejected:
    """The shards of a valid split (in pipeline order), or why the split is rejected."""
    if not stages:
        return SplitRejected(code="no_stages", message="a manual split needs at least one stage")
    if len(stages) > min(MAX_STAGES, len(runner_ids)):
        return SplitRejected(
            code="too_many_stages",
            message=f"{len(stages)} stages; at most {min(MAX_STAGES, len(runner_ids))}",
        )
    at = 0
    for i, stage in enumerate(stages):
        where = f"stage {i} (layers [{stage.start_layer}, {stage.end_layer}) on {stage.node_id})"
        if stage.end_layer <= stage.start_layer:
            return SplitRejected(code="empty_range", message=f"{where} holds no layer", stage=i)
        if stage.start_layer != at:
            return SplitRejected(
                code="not_contiguous",
                message=f"{where} starts at layer {stage.start_layer}; layer {at} comes next",
                stage=i,
            )
        if stage.end_layer > card.n_layers:
            return SplitRejected(
                code="beyond_model",
                message=f"{where} ends past the model's {card.n_layers} layers",
                stage=i,
            )
        at = stage.end_layer
        node = state.nodes.get(stage.node_id)
        if node is None:
            return SplitRejected(
                code="unknown_node", message=f"{where}: no node {stage.node_id}", stage=i
            )
        if node.status != "up":
            return SplitRejected(
                code="node_down", message=f"{where}: node {stage.node_id} is down", stage=i
            )
        if stage.engine not in ENGINES:
            return SplitRejected(
                code="unknown_engine",
                message=f"{where}: engine {stage.engine!r} is not one of {', '.join(ENGINES)}",
                stage=i,
            )
        devices = state.node_devices.get(stage.node_id)
        known = {d.device_id for d in devices.devices} if devices is not None else set[str]()
        # Before a node's telemetry reports its inventory only its CPU is known for sure.
        if stage.device not in known | {"cpu"}:
            listed = ", ".join(sorted(known | {"cpu"}))
            return SplitRejected(
                code="unknown_device",
                message=f"{where}: node has no device {stage.device!r} (it has {listed})",
                stage=i,
            )
    if at != card.n_layers:
        return SplitRejected(
            code="incomplete",
            message=f"the stages cover layers [0, {at}) of the model's {card.n_layers}",
        )
    return tuple(
        ShardAssignment(
            runner_id=runner_ids[i],
            node_id=stage.node_id,
            device=stage.device,
            engine=_engine(stage.engine),
            start_layer=stage.start_layer,
            end_layer=stage.end_layer,
            n_layers=card.n_layers,
        )
        for i, stage in enumerate(stages)
    )


def _engine(name: str) -> EngineName:
    match name:
        case "mlx" | "torch":
            return name
        case _:
            raise ValueError(f"unknown engine {name!r}")
