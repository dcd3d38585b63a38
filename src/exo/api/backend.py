"""What the HTTP API needs from the node it runs in; the node implements it, tests read it."""

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from anyio.abc import ObjectReceiveStream

from exo.models.download import GrowingFile
from exo.shared.types.cluster import ClusterStatus
from exo.shared.types.commands import Command, CommandReply
from exo.shared.types.events import IndexedEvent
from exo.shared.types.ids import ModelId, NodeId, TaskId
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State
from exo.shared.types.stream import StreamMessage


class ApiBackend(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    def state(self) -> State:
        """The state as folded up to this node's last applied event."""
        ...

    def cluster_status(self) -> ClusterStatus:
        """This node's view of the cluster: role, term, master, voters, connected peers."""
        ...

    def model_cards(self) -> Sequence[ModelCard]: ...

    def model_card(self, model_id: ModelId) -> ModelCard | None: ...

    async def describe_hub_model(self, repo: str, revision: str) -> ModelCard:
        """The card of a hub repository at `revision`'s commit, read from the hub (no weights).

        Raises `exo.models.hub.HubError` (and its kinds) or `UnsupportedModel`."""
        ...

    def model_file(self, repo: str, commit: str, path: str) -> Path | None:
        """A whole, checked file of hub model `repo` at `commit` in this node's store (None:
        not here), served to peers that download it. Blocks (disk): call from a thread."""
        ...

    def model_part(self, repo: str, commit: str, path: str) -> GrowingFile | None:
        """A file of hub model `repo` at `commit` that this node's download is fetching now
        (None: none is), which a peer may follow as it arrives. Blocks: call from a thread."""
        ...

    def model_listing(self, repo: str, commit: str) -> bytes | None:
        """The hub's file listing of `repo` at `commit`, as this node's download read it."""
        ...

    async def send_command(self, command: Command) -> CommandReply:
        """Deliver to the master and wait for its accept/reject (raises TimeoutError)."""
        ...

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        """Return the first state (current or later) satisfying predicate; TimeoutError if none."""
        ...

    def subscribe_stream(
        self, task_id: TaskId
    ) -> AbstractAsyncContextManager[ObjectReceiveStream[StreamMessage]]:
        """Receive the task's generated tokens; subscribe before the task is created."""
        ...

    def subscribe_events(
        self, from_index: int
    ) -> AbstractAsyncContextManager[ObjectReceiveStream[IndexedEvent]]:
        """Indexed events from `from_index` on (replayed from the log, then live)."""
        ...
