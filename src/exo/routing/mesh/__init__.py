"""Mesh transport between exo nodes: authenticated TCP connections carrying typed frames.

See docs/mesh.md (wire format, handshake, defaults) and docs/security.md.
"""

from exo.routing.mesh.mesh import (
    DEFAULT_MESH_PORT,
    Incoming,
    Mesh,
    MeshConfig,
    MeshError,
    MessageTooLarge,
    PeerInfo,
    PeerUnavailable,
)
from exo.routing.mesh.messages import (
    PROTOCOL_VERSION,
    ConsensusPacket,
    MeshMessage,
    Ping,
    Pong,
    TopicMessage,
    WireMessage,
)

__all__ = [
    "DEFAULT_MESH_PORT",
    "PROTOCOL_VERSION",
    "ConsensusPacket",
    "Incoming",
    "Mesh",
    "MeshConfig",
    "MeshError",
    "MeshMessage",
    "MessageTooLarge",
    "PeerInfo",
    "PeerUnavailable",
    "Ping",
    "Pong",
    "TopicMessage",
    "WireMessage",
]
