"""Events: the only way state changes. `Event` is a closed, discriminated union."""

from typing import Annotated, Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.chat import FinishReason
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.runners import RunnerStatus
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


class ModelStoreProgress(Frozen):
    """A node preparing a model in its store (conversion or download)."""

    kind: Literal["model_store_progress"] = "model_store_progress"
    node_id: NodeId
    model_id: ModelId
    done_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    complete: bool


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


Event = Annotated[
    NodeStarted
    | InstanceCreated
    | InstanceDeleted
    | RunnerStatusChanged
    | TaskCreated
    | TaskStarted
    | TaskFirstToken
    | TaskFinished
    | TaskFailed
    | TaskCancelled
    | ModelStoreProgress
    | DeviceInventoryReported
    | DeviceMetricsReported
    | LinkProfileMeasured,
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
