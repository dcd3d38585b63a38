"""The cluster state every node folds from the same log."""

import hashlib
from typing import Literal

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.events import EventOrigin, ModelStoreProgress
from exo.shared.types.ids import InstanceId, ModelId, NodeId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.models import ModelCard
from exo.shared.types.runners import RunnerEndpoint, RunnerStatus
from exo.shared.types.tasks import Task
from exo.shared.types.telemetry import LinkProfile, NodeDevices


class NodeInfo(Frozen):
    node_id: NodeId
    session: str
    hostname: str
    api_port: int
    started_at_ms: int
    status: Literal["up", "down"] = "up"


class TaskCounters(Frozen):
    finished: int = 0
    failed: int = 0
    completion_tokens: int = 0


class State(Frozen):
    last_index: int = Field(default=-1, ge=-1)
    term: int = Field(default=0, ge=0)
    # The master of `term` (from its MasterElected entry); None before the first election.
    master: NodeId | None = None
    nodes: dict[NodeId, NodeInfo] = Field(default_factory=dict[NodeId, NodeInfo])
    instances: dict[InstanceId, Instance] = Field(default_factory=dict[InstanceId, Instance])
    runners: dict[RunnerId, RunnerStatus] = Field(default_factory=dict[RunnerId, RunnerStatus])
    # Pipeline stages' listen addresses (runners of single-stage instances have none).
    runner_endpoints: dict[RunnerId, RunnerEndpoint] = Field(
        default_factory=dict[RunnerId, RunnerEndpoint]
    )
    # Only tasks in flight; finished ones leave a trace in `counters` and the log.
    tasks: dict[TaskId, Task] = Field(default_factory=dict[TaskId, Task])
    # Models added from the hub (the built-in ones are in every node's code).
    models: dict[ModelId, ModelCard] = Field(default_factory=dict[ModelId, ModelCard])
    # Hub models taken out of the catalogue (id -> the source it had): nodes delete their
    # files, also a node that was down when it happened. Added again: no longer here.
    removed_models: dict[ModelId, str] = Field(default_factory=dict[ModelId, str])
    # Keyed "<node id>/<model id>".
    model_progress: dict[str, ModelStoreProgress] = Field(
        default_factory=dict[str, ModelStoreProgress]
    )
    # Highest origin_seq indexed per origin: the master's de-duplication survives failover.
    origin_seqs: dict[EventOrigin, int] = Field(default_factory=dict[EventOrigin, int])
    counters: TaskCounters = TaskCounters()
    # Telemetry: each node's devices and their latest figures, and measured links
    # (links[source][target]).
    node_devices: dict[NodeId, NodeDevices] = Field(default_factory=dict[NodeId, NodeDevices])
    links: dict[NodeId, dict[NodeId, LinkProfile]] = Field(
        default_factory=dict[NodeId, dict[NodeId, LinkProfile]]
    )

    def state_hash(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()
