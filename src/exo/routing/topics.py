"""The typed topics nodes talk on. Local subscribers get objects; the mesh carries JSON."""

from dataclasses import dataclass
from typing import Generic, TypeVar

from exo.shared.types.base import Frozen
from exo.shared.types.commands import CommandEnvelope, CommandReply
from exo.shared.types.events import IndexedEvent, LocalEvent
from exo.shared.types.ids import NodeId
from exo.shared.types.stream import StreamMessage

T = TypeVar("T")


@dataclass(frozen=True)
class Topic(Generic[T]):
    name: str


class AddressedReply(Frozen):
    """A command reply on its way back to the node whose API sent the command."""

    to: NodeId
    reply: CommandReply


class AddressedStream(Frozen):
    """Generated text on its way to the node that owns the client connection."""

    to: NodeId
    message: StreamMessage


COMMANDS: Topic[CommandEnvelope] = Topic("commands")
COMMAND_REPLIES: Topic[AddressedReply] = Topic("command_replies")
LOCAL_EVENTS: Topic[LocalEvent] = Topic("local_events")
GLOBAL_EVENTS: Topic[IndexedEvent] = Topic("global_events")
TOKENS: Topic[AddressedStream] = Topic("tokens")
