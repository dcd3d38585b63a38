"""A node's view of the cluster it is in (not part of the replicated state)."""

from pydantic import Field

from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId


class ClusterStatus(Frozen):
    """This node's view of the cluster (for `GET /state` and the dashboard)."""

    node_id: NodeId
    cluster: str | None
    role: str
    term: int
    master: NodeId | None
    commit: int
    log_last_index: int
    # Voting members and their seniority (log index of their join).
    voters: dict[NodeId, int]
    # Peers the mesh is connected to now, with the smoothed RTT in ms (None: not yet).
    connected: dict[NodeId, float | None]
    # Nodes refused in the last minute as unable to join this one's cluster as they are
    # (another build or protocol version, namespace or secret; a node id clash): their
    # address -> why. Empty when all is well.
    refused: dict[str, str] = Field(default_factory=dict[str, str])
