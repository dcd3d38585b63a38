"""The cluster's consensus core: election, log replication, membership, catch-up.

Pure and deterministic (etcd raft style): the caller feeds packets and ticks into a
`ConsensusNode` and drains `Ready` (persist, then send, then apply). See docs/consensus.md.
"""

from exo.routing.consensus.config import ConsensusConfig
from exo.routing.consensus.entries import (
    ClusterEvent,
    CommandDecided,
    LogEntry,
    MasterElected,
    MemberJoined,
    MemberLeft,
    Membership,
    MemberTimedOut,
    apply_entry,
)
from exo.routing.consensus.messages import ConsensusMessage, HardState, Packet, Snapshot
from exo.routing.consensus.node import Claim, ConsensusNode, Decider, Role
from exo.routing.consensus.ready import Ready, Restored

__all__ = [
    "Claim",
    "ClusterEvent",
    "CommandDecided",
    "ConsensusConfig",
    "ConsensusMessage",
    "ConsensusNode",
    "Decider",
    "HardState",
    "LogEntry",
    "MasterElected",
    "MemberJoined",
    "MemberLeft",
    "MemberTimedOut",
    "Membership",
    "Packet",
    "Ready",
    "Restored",
    "Role",
    "Snapshot",
    "apply_entry",
]
