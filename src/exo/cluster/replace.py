"""Re-place what a lost node ran, on the nodes that are left.

When a member times out or leaves, `apply` marks every instance with a shard on it as
failed. The node that is master then replaces each such instance: it deletes the failed
one and asks for the model again (`PlaceInstance`, unpinned: if another healthy instance
of the model serves, that one is kept and nothing new is placed). If nothing fits, the
rejection is logged and the model is placed again at its next request, which then fails
with the placement's reason. Instances that failed for other reasons (a runner crash)
are re-placed on demand by the next request, not here, so a crashing model cannot loop.
"""

from collections.abc import Awaitable, Callable

import anyio
from loguru import logger

from exo.shared.types.commands import Command, CommandReply, DeleteInstance, PlaceInstance
from exo.shared.types.ids import InstanceId
from exo.shared.types.instances import Instance
from exo.shared.types.state import State
from exo.shared.views import StateView


def lost_instances(state: State) -> list[Instance]:
    """Failed instances with a shard on a node that is down, oldest first."""
    down = {node for node, info in state.nodes.items() if info.status == "down"}
    return sorted(
        (
            i
            for i in state.instances.values()
            if i.failed_reason is not None and any(s.node_id in down for s in i.shards)
        ),
        key=lambda i: i.created_at_ms,
    )


class Replacer:
    def __init__(
        self,
        *,
        view: StateView,
        is_master: Callable[[], bool],
        send_command: Callable[[Command], Awaitable[CommandReply]],
    ) -> None:
        self._view = view
        self._is_master = is_master
        self._send = send_command
        self._handled: set[InstanceId] = set()

    async def run(self) -> None:
        while True:
            if self._is_master():
                for instance in lost_instances(self._view.state):
                    if instance.instance_id not in self._handled:
                        self._handled.add(instance.instance_id)
                        await self._replace(instance)
            with anyio.move_on_after(1.0):  # mastership changes without a state change
                await self._view.wait_changed()

    async def _replace(self, instance: Instance) -> None:
        logger.info(
            f"re-placing {instance.model_id} (instance {instance.instance_id}: "
            f"{instance.failed_reason})"
        )
        await self._send(
            DeleteInstance(instance_id=instance.instance_id)
        )  # a rejection means it is gone already
        reply = await self._send(PlaceInstance(model_id=instance.model_id))
        if reply.kind == "rejected":
            logger.warning(f"could not re-place {instance.model_id}: {reply.message}")
        else:
            logger.info(f"{instance.model_id} re-placed as {reply.created_id}")
