"""Commands: requests to the master, each answered by an explicit accept or typed reject."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.ids import CommandId, InstanceId, ModelId, NodeId, TaskId
from exo.shared.types.instances import EngineName
from exo.shared.types.models import ModelCard


class PinnedStage(Frozen):
    """One stage of a manual split: layers [start_layer, end_layer) on a node's device.

    `engine` is a plain string so that a wrong name gets the master's typed rejection
    (`exo.master.manual_split`) rather than a parse error."""

    node_id: NodeId
    device: str = "cpu"
    engine: str
    start_layer: int
    end_layer: int


class PlaceInstance(Frozen):
    kind: Literal["place_instance"] = "place_instance"
    model_id: ModelId
    # Pin to one node (None: the master chooses).
    node_id: NodeId | None = None
    engine: EngineName | None = None
    # A manual split in pipeline order (None: the master chooses); always a new instance.
    stages: tuple[PinnedStage, ...] | None = None
    # For the solver (docs/placement.md): what to optimise, the context to reserve KV
    # cache for, and which nodes/devices ("<node>/<device>") may or may not take part.
    objective: Literal["latency", "throughput"] | None = None
    context_length: int | None = Field(default=None, gt=0)
    include_nodes: tuple[NodeId, ...] | None = None
    exclude_nodes: tuple[NodeId, ...] = ()
    include_devices: tuple[str, ...] | None = None
    exclude_devices: tuple[str, ...] = ()


class DeleteInstance(Frozen):
    kind: Literal["delete_instance"] = "delete_instance"
    instance_id: InstanceId


class CreateTask(Frozen):
    kind: Literal["create_task"] = "create_task"
    task_id: TaskId
    model_id: ModelId
    owner: NodeId
    params: ChatParams


class CancelTask(Frozen):
    kind: Literal["cancel_task"] = "cancel_task"
    task_id: TaskId
    reason: str


class AddModel(Frozen):
    """Put a model's card (read from the hub by the API's node) in the cluster's catalogue."""

    kind: Literal["add_model"] = "add_model"
    card: ModelCard


class RemoveModel(Frozen):
    """Take a model added from the hub out of the catalogue; nodes then delete its files."""

    kind: Literal["remove_model"] = "remove_model"
    model_id: ModelId


Command = Annotated[
    PlaceInstance | DeleteInstance | CreateTask | CancelTask | AddModel | RemoveModel,
    Field(discriminator="kind"),
]


class CommandEnvelope(Frozen):
    command_id: CommandId
    origin: NodeId
    command: Command


RejectionCode = Literal[
    "unknown_model",
    "no_instance",
    "not_found",
    "placement_failed",
    "not_master",
    "invalid",
    # A manual split that is not contiguous, misses layers, names unknown nodes/engines...
    "invalid_split",
    # The master could not make the command's events durable (disk full, I/O error).
    "unavailable",
]


class CommandAccepted(Frozen):
    kind: Literal["accepted"] = "accepted"
    command_id: CommandId
    # The id the command created (instance or task), when it created one.
    created_id: str | None = None
    # Log index of the last event the command produced: wait for it to be applied.
    last_index: int = Field(ge=-1)


class CommandRejected(Frozen):
    kind: Literal["rejected"] = "rejected"
    command_id: CommandId
    code: RejectionCode
    message: str


CommandReply = Annotated[CommandAccepted | CommandRejected, Field(discriminator="kind")]
