"""Where a new instance goes. For now one stage on one node; the CP-SAT solver replaces it.

Pure: a function of the model card, the state and the request.
"""

from exo.shared.types.base import Frozen
from exo.shared.types.commands import PlaceInstance
from exo.shared.types.ids import NodeId, RunnerId
from exo.shared.types.instances import EngineName, ShardAssignment
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State


class PlacementError(Frozen):
    reason: str


def place_instance(
    card: ModelCard,
    state: State,
    request: PlaceInstance,
    runner_ids: list[RunnerId],
    default_engine: EngineName,
) -> tuple[ShardAssignment, ...] | PlacementError:
    up = sorted(n.node_id for n in state.nodes.values() if n.status == "up")
    if request.node_id is not None:
        if request.node_id not in up:
            return PlacementError(
                reason=f"node {request.node_id} is not an up member of the cluster"
            )
        node: NodeId = request.node_id
    elif up:
        node = _least_loaded(state, up)
    else:
        return PlacementError(reason="no node is up")
    return (
        ShardAssignment(
            runner_id=runner_ids[0],
            node_id=node,
            device="cpu",
            engine=request.engine or default_engine,
            start_layer=0,
            end_layer=card.n_layers,
            n_layers=card.n_layers,
        ),
    )


def _least_loaded(state: State, nodes: list[NodeId]) -> NodeId:
    load = {n: 0 for n in nodes}
    for instance in state.instances.values():
        for shard in instance.shards:
            if shard.node_id in load:
                load[shard.node_id] += 1
    return min(nodes, key=lambda n: (load[n], n))
