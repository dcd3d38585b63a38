"""Instances: one placed copy of a model, split into pipeline stages (shards)."""

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.engines import EngineName as EngineName
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId
from exo.shared.types.placement import Objective, SolverStatus

# How many finished tasks the measured figures of an instance average over.
MEASURED_WINDOW = 10


class ShardAssignment(Frozen):
    """One pipeline stage: layers [start_layer, end_layer) of the model on one node's device."""

    runner_id: RunnerId
    node_id: NodeId
    device: str
    engine: EngineName
    start_layer: int = Field(ge=0)
    end_layer: int = Field(gt=0)
    n_layers: int = Field(gt=0)


class StagePrediction(Frozen):
    """One stage's predicted share of a token (seconds), in pipeline order."""

    device_id: str
    decode_s: float = Field(ge=0.0)
    prefill_s: float = Field(ge=0.0)
    # Activation hand-off to the next stage (the last stage: the token's return trip).
    handoff_s: float = Field(ge=0.0)


class InstancePrediction(Frozen):
    """What placement predicted for the instance (docs/placement.md), to set beside `measured`."""

    objective: Objective
    solver_status: SolverStatus
    solve_time_s: float = Field(ge=0.0)
    # One stream: 1 / time_per_token_s.
    tokens_per_s: float = Field(gt=0.0)
    time_per_token_s: float = Field(gt=0.0)
    # Many streams in flight: the busiest stage or link sets the pace.
    throughput_tokens_per_s: float = Field(gt=0.0)
    ttft_s: float = Field(ge=0.0)
    reference_prompt_tokens: int = Field(gt=0)
    context_length: int = Field(gt=0)
    stages: tuple[StagePrediction, ...] = ()


class InstanceMeasured(Frozen):
    """Decode tokens/s its finished tasks reported (folded from `TaskFinished`; tasks of
    fewer than two tokens have no decode rate and are not counted)."""

    measured_tasks: int = Field(ge=0)
    last_decode_tokens_per_s: float = Field(ge=0.0)
    # The last MEASURED_WINDOW tasks, oldest first, and their mean.
    recent_decode_tokens_per_s: tuple[float, ...] = ()
    mean_decode_tokens_per_s: float = Field(ge=0.0)


class Instance(Frozen):
    instance_id: InstanceId
    model_id: ModelId
    # Pipeline order: shards[0] embeds, shards[-1] samples.
    shards: tuple[ShardAssignment, ...] = Field(min_length=1)
    # Set once any of its runners failed; a failed instance serves no new task.
    failed_reason: str | None = None
    created_at_ms: int = Field(ge=0)
    # Set by the master's solver placement; None for a manual split it did not cost.
    prediction: InstancePrediction | None = None
    # None until a task of the instance finishes with at least two tokens.
    measured: InstanceMeasured | None = None
