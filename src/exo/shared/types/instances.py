"""Instances: one placed copy of a model, split into pipeline stages (shards)."""

from typing import Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId

EngineName = Literal["mlx", "torch"]


class ShardAssignment(Frozen):
    """One pipeline stage: layers [start_layer, end_layer) of the model on one node's device."""

    runner_id: RunnerId
    node_id: NodeId
    device: str
    engine: EngineName
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    n_layers: int = Field(gt=0)


class Instance(Frozen):
    instance_id: InstanceId
    model_id: ModelId
    # Pipeline order: shards[0] embeds, shards[-1] samples.
    shards: tuple[ShardAssignment, ...] = Field(min_length=1)
    # Set once any of its runners failed; a failed instance serves no new task.
    failed_reason: str | None = None
    created_at_ms: int = Field(ge=0)
