"""The typed topics a node's components talk on. Local subscribers get objects; the
cluster service carries the ones addressed to another node over the mesh as JSON."""

from dataclasses import dataclass
from typing import Generic, TypeVar

from exo.shared.types.base import Frozen
from exo.shared.types.ids import NodeId
from exo.shared.types.stream import StreamMessage

T = TypeVar("T")


@dataclass(frozen=True)
class Topic(Generic[T]):
    name: str


class AddressedStream(Frozen):
    """Generated text on its way to the node that owns the client connection."""

    to: NodeId
    message: StreamMessage


TOKENS: Topic[AddressedStream] = Topic("tokens")
