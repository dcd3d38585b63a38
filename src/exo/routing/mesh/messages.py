"""What travels over a mesh connection: handshake messages, then typed frames.

Everything is a frozen, strict pydantic model serialised as JSON. The handshake messages
are parsed with a version check first (see `parse_handshake`), so a peer of another
protocol version gets a clear `Reject` instead of a validation error.
"""

import json
from typing import Annotated, Literal

from pydantic import Field, TypeAdapter, ValidationError

from exo.routing.consensus.messages import Packet
from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId

# 2: the hello carries the schema fingerprint of the messages inside the frames.
PROTOCOL_VERSION = 2
MAGIC = "exo-mesh"
NONCE_BYTES = 32
# What a node id / namespace may look like on the wire (also keeps log lines clean).
NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,199}$"
NAMESPACE_PATTERN = r"^[\x20-\x7e]{0,200}$"

# ---------------------------------------------------------------- data frames


class ConsensusPacket(Frozen):
    """A consensus `Packet`, typed: the receiver validates it before delivery."""

    kind: Literal["consensus"] = "consensus"
    packet: Packet


class TopicMessage(Frozen):
    """A message on one of the router's topics (data plane: tokens, ...).

    `payload` is the JSON text of the topic's model (`model.model_dump_json()`); the
    subscriber side validates it with the topic's type (`Model.model_validate_json`).
    """

    kind: Literal["topic"] = "topic"
    topic: str = Field(min_length=1, max_length=200)
    payload: str


class Ping(Frozen):
    """Heartbeat; `sent_ns` is the sender's monotonic clock, echoed back in the `Pong`."""

    kind: Literal["ping"] = "ping"
    sent_ns: int = Field(ge=0)


class Pong(Frozen):
    kind: Literal["pong"] = "pong"
    echo_ns: int = Field(ge=0)


WireMessage = Annotated[ConsensusPacket | TopicMessage | Ping | Pong, Field(discriminator="kind")]
WIRE: TypeAdapter[ConsensusPacket | TopicMessage | Ping | Pong] = TypeAdapter(WireMessage)

# What callers hand to `Mesh.send` and get from `Mesh.incoming()`.
MeshMessage = Packet | TopicMessage

# ---------------------------------------------------------------- handshake

RejectReason = Literal[
    "malformed",  # not an exo mesh handshake
    "version",  # another protocol version
    "schema",  # another message schema: another build of exo
    "namespace",  # another cluster namespace
    "auth_mismatch",  # one side has a cluster secret, the other not
    "auth_failed",  # wrong secret (bad proof)
    "duplicate",  # a connection between the two nodes already exists or wins the tie-break
    "self",  # dialled our own listener
    "id_conflict",  # another process claims our node id (copied data directory?)
]


class Hello(Frozen):
    kind: Literal["hello"] = "hello"
    magic: Literal["exo-mesh"] = MAGIC
    protocol_version: int
    node_id: NodeId = Field(pattern=NODE_ID_PATTERN)
    namespace: str = Field(pattern=NAMESPACE_PATTERN)
    # Random per process: tells a restarted peer from a duplicate connection.
    instance: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    listen_port: int = Field(ge=0, lt=65536)
    # `exo.shared.schema_fingerprint` of what travels inside the frames (the mesh's user
    # says what that is); peers must agree, or every frame would be malformed to one side.
    schema_fingerprint: str = Field(pattern=r"^[0-9a-f]{0,64}$")
    # NONCE_BYTES random bytes, hex.
    nonce: str = Field(pattern=rf"^[0-9a-f]{{{2 * NONCE_BYTES}}}$")
    authenticated: bool


class Proof(Frozen):
    """HMAC-SHA256 over the handshake transcript with the cluster key (hex)."""

    kind: Literal["proof"] = "proof"
    mac: str = Field(pattern=r"^[0-9a-f]{64}$")


class Accept(Frozen):
    kind: Literal["accept"] = "accept"


class Reject(Frozen):
    kind: Literal["reject"] = "reject"
    reason: RejectReason
    detail: str = Field(max_length=1000)


HandshakeMessage = Annotated[Hello | Proof | Accept | Reject, Field(discriminator="kind")]
HANDSHAKE: TypeAdapter[Hello | Proof | Accept | Reject] = TypeAdapter(HandshakeMessage)


def printable(text: str, limit: int = 300) -> str:
    """Peer-controlled text made safe for one log line: no control characters, bounded."""
    clean = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text[: limit + 1])
    return clean if len(clean) <= limit else clean[:limit] + "..."


class HandshakeParseError(ValueError):
    def __init__(self, reason: RejectReason, detail: str) -> None:
        detail = printable(detail)
        super().__init__(detail)
        self.reason: RejectReason = reason
        self.detail = detail


def parse_handshake(raw: bytes) -> Hello | Proof | Accept | Reject:
    """Parse one handshake frame; a Hello of another protocol version is reported as such."""
    try:
        obj: object = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise HandshakeParseError("malformed", f"handshake frame is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise HandshakeParseError("malformed", "handshake frame is not a JSON object")
    fields: dict[str, object] = {str(k): v for k, v in obj.items()}  # pyright: ignore[reportUnknownVariableType, reportUnknownArgumentType]
    if fields.get("kind") == "hello":
        if fields.get("magic") != MAGIC:
            raise HandshakeParseError("malformed", "not an exo mesh peer (bad magic)")
        version = fields.get("protocol_version")
        if version != PROTOCOL_VERSION:
            raise HandshakeParseError(
                "version",
                f"mesh protocol versions differ: the hello is version {version!r}, "
                f"the receiving node speaks version {PROTOCOL_VERSION}",
            )
    try:
        return HANDSHAKE.validate_json(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise HandshakeParseError(
            "malformed", f"invalid handshake message: {first['loc']}: {first['msg']}"
        ) from None
