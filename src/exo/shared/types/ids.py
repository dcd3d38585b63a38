"""Distinct id types: a NodeId can never be passed where a TaskId is expected."""

import uuid
from typing import NewType

NodeId = NewType("NodeId", str)
InstanceId = NewType("InstanceId", str)
RunnerId = NewType("RunnerId", str)
TaskId = NewType("TaskId", str)
CommandId = NewType("CommandId", str)
ModelId = NewType("ModelId", str)


def new_instance_id() -> InstanceId:
    return InstanceId(f"inst-{uuid.uuid4().hex[:12]}")


def new_runner_id() -> RunnerId:
    return RunnerId(f"run-{uuid.uuid4().hex[:12]}")


def new_task_id() -> TaskId:
    return TaskId(f"chatcmpl-{uuid.uuid4().hex[:24]}")


def new_command_id() -> CommandId:
    return CommandId(f"cmd-{uuid.uuid4().hex[:16]}")
