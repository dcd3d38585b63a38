"""Runner lifecycle: every status a runner reports, as one discriminated union."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId


class RunnerSpawning(Frozen):
    kind: Literal["spawning"] = "spawning"


class RunnerLoading(Frozen):
    kind: Literal["loading"] = "loading"
    # Fraction in [0, 1] of the shard's weights loaded (or converted, before loading).
    progress: float = Field(ge=0.0, le=1.0)


class RunnerWarmingUp(Frozen):
    kind: Literal["warming_up"] = "warming_up"


class RunnerReady(Frozen):
    kind: Literal["ready"] = "ready"


class RunnerRunning(Frozen):
    kind: Literal["running"] = "running"


class RunnerFailed(Frozen):
    kind: Literal["failed"] = "failed"
    reason: str


class RunnerStopped(Frozen):
    kind: Literal["stopped"] = "stopped"


RunnerStatus = Annotated[
    RunnerSpawning
    | RunnerLoading
    | RunnerWarmingUp
    | RunnerReady
    | RunnerRunning
    | RunnerFailed
    | RunnerStopped,
    Field(discriminator="kind"),
]


class RunnerEndpoint(Frozen):
    """Where a pipeline stage's runner listens for the previous stage's activations."""

    node_id: NodeId
    # The node's advertised address; a stage on the same node connects over loopback.
    host: str
    port: int = Field(gt=0, lt=65536)


TERMINAL_RUNNER_KINDS = frozenset({"failed", "stopped"})
SERVING_RUNNER_KINDS = frozenset({"ready", "running"})
