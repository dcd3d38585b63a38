"""Tasks: one chat completion's lifecycle, as the log records it (never its tokens)."""

from typing import Literal

from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.ids import InstanceId, NodeId, TaskId

TaskStatus = Literal["pending", "running"]


class Task(Frozen):
    task_id: TaskId
    instance_id: InstanceId
    # The node whose API holds the client connection; tokens stream there.
    owner: NodeId
    params: ChatParams
    status: TaskStatus = "pending"
    created_at_ms: int
