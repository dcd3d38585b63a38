"""Events: the only way state changes. `Event` is a closed, discriminated union."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.chat import FinishReason
from exo.shared.types.commands import CommandReply
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.models import ModelCard
from exo.shared.types.runners import RunnerEndpoint, RunnerStatus
from exo.shared.types.tasks import Task
from exo.shared.types.telemetry import DeviceMetrics, DeviceSpec, LinkProfile

# "<node id>/<session>": each daemon process numbers its local events afresh.
EventOrigin = str


class NodeStarted(Frozen):
    """A daemon process came up; what it ran before (tasks it owned or served) is gone."""

    kind: Literal["node_started"] = "node_started"
    node_id: NodeId
    session: str
    hostname: str
    api_port: int = Field(gt=0, lt=65536)
    started_at_ms: int = Field(ge=0)


class InstanceCreated(Frozen):
    kind: Literal["instance_created"] = "instance_created"
    instance: Instance


class InstanceDeleted(Frozen):
    kind: Literal["instance_deleted"] = "instance_deleted"
    instance_id: InstanceId
    reason: str


class RunnerStatusChanged(Frozen):
    kind: Literal["runner_status_changed"] = "runner_status_changed"
    runner_id: RunnerId
    status: RunnerStatus


class RunnerEndpointReported(Frozen):
    """A pipeline stage's runner listens here (before it loads: its neighbours link up)."""

    kind: Literal["runner_endpoint_reported"] = "runner_endpoint_reported"
    runner_id: RunnerId
    endpoint: RunnerEndpoint


class TaskCreated(Frozen):
    kind: Literal["task_created"] = "task_created"
    task: Task


class TaskStarted(Frozen):
    kind: Literal["task_started"] = "task_started"
    task_id: TaskId


class TaskFirstToken(Frozen):
    kind: Literal["task_first_token"] = "task_first_token"
    task_id: TaskId
    time_to_first_token_ms: float = Field(ge=0.0)


class TaskFinished(Frozen):
    kind: Literal["task_finished"] = "task_finished"
    task_id: TaskId
    finish_reason: FinishReason
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    decode_tokens_per_s: float = Field(ge=0.0)


class TaskFailed(Frozen):
    kind: Literal["task_failed"] = "task_failed"
    task_id: TaskId
    reason: str


class TaskCancelled(Frozen):
    kind: Literal["task_cancelled"] = "task_cancelled"
    task_id: TaskId
    reason: str


class ModelAdded(Frozen):
    """A model from the hub joined the catalogue (or its card moved to a newer commit)."""

    kind: Literal["model_added"] = "model_added"
    card: ModelCard


class ModelRemoved(Frozen):
    """A model added from the hub left the catalogue (no instance of it was left)."""

    kind: Literal["model_removed"] = "model_removed"
    model_id: ModelId


class ModelStoreProgress(Frozen):
    """A node preparing a model in its store (conversion or download)."""

    kind: Literal["model_store_progress"] = "model_store_progress"
    node_id: NodeId
    model_id: ModelId
    done_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    complete: bool


class ModelFilesRemoved(Frozen):
    """A hub model's files left a node's store (removed as the least recently used, to keep
    the store within its size limit, or found gone when the node started): it holds no copy
    of the model now."""

    kind: Literal["model_files_removed"] = "model_files_removed"
    node_id: NodeId
    model_id: ModelId


class DeviceInventoryReported(Frozen):
    """A node's full device list: sent when its telemetry starts and when devices change."""

    kind: Literal["device_inventory_reported"] = "device_inventory_reported"
    node_id: NodeId
    devices: tuple[DeviceSpec, ...]
    reported_at_ms: int = Field(ge=0)


class DeviceMetricsReported(Frozen):
    """Live figures of a node's devices (keyed by device id): change-detected, rate-limited."""

    kind: Literal["device_metrics_reported"] = "device_metrics_reported"
    node_id: NodeId
    metrics: dict[str, DeviceMetrics]
    reported_at_ms: int = Field(ge=0)


class LinkProfileMeasured(Frozen):
    """A measured link from `source` to `target` (RTT and bulk bandwidth)."""

    kind: Literal["link_profile_measured"] = "link_profile_measured"
    source: NodeId
    target: NodeId
    profile: LinkProfile


# --- the cluster's own events (membership, election, command outcomes) -------------------


class MemberJoined(Frozen):
    """A node became a voting member (after it caught up with the log)."""

    kind: Literal["member_joined"] = "member_joined"
    node_id: NodeId


class MemberLeft(Frozen):
    """A node asked to leave; it no longer votes or counts towards a quorum."""

    kind: Literal["member_left"] = "member_left"
    node_id: NodeId


class MemberTimedOut(Frozen):
    """The master heard nothing from a member for the timeout; it stops counting it."""

    kind: Literal["member_timed_out"] = "member_timed_out"
    node_id: NodeId
    silent_ms: int = Field(ge=0)


class MasterElected(Frozen):
    """First entry of every master's term (raft's no-op): commits the tail it inherited."""

    kind: Literal["master_elected"] = "master_elected"
    node_id: NodeId
    term: int = Field(ge=1)


class CommandDecided(Frozen):
    """A command's outcome, after its events: makes commands exactly-once across failover."""

    kind: Literal["command_decided"] = "command_decided"
    # The node whose API sent the command: the master sends it the reply on commit.
    node_id: NodeId
    reply: CommandReply


Event = Annotated[
    NodeStarted
    | InstanceCreated
    | InstanceDeleted
    | RunnerStatusChanged
    | RunnerEndpointReported
    | TaskCreated
    | TaskStarted
    | TaskFirstToken
    | TaskFinished
    | TaskFailed
    | TaskCancelled
    | ModelAdded
    | ModelRemoved
    | ModelStoreProgress
    | ModelFilesRemoved
    | DeviceInventoryReported
    | DeviceMetricsReported
    | LinkProfileMeasured
    | MemberJoined
    | MemberLeft
    | MemberTimedOut
    | MasterElected
    | CommandDecided,
    Field(discriminator="kind"),
]


class LocalEvent(Frozen):
    """An event as its producer emits it, before the master has indexed it."""

    origin: EventOrigin
    origin_seq: int = Field(ge=0)
    event: Event


class IndexedEvent(Frozen):
    """An event with its place in the global log; the unit of replication and replay."""

    index: int = Field(ge=0)
    term: int = Field(ge=0)
    origin: EventOrigin
    origin_seq: int = Field(ge=0)
    event: Event
