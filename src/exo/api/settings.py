"""Every timeout and default of the HTTP API, with sane values and one place to set them."""

from pydantic import Field

from exo.config import MAX_REQUEST_BYTES, NodeConfig
from exo.shared.types.base import Frozen


class ApiSettings(Frozen):
    # Bound on one command's accept/reject from the master.
    command_timeout_s: float = Field(default=10.0, gt=0)
    # Bound on an instance going from placed to serving (all its runners ready).
    load_timeout_s: float = Field(default=300.0, gt=0)
    # A running task with no token for this long is cancelled and answered with 504.
    stall_timeout_s: float = Field(default=120.0, gt=0)
    # A task that left the state (finished, failed) but whose stream never ended: 503 after this.
    result_grace_s: float = Field(default=10.0, gt=0)
    # Last-resort bound on one request, queueing behind other requests included.
    generation_timeout_s: float = Field(default=1800.0, gt=0)
    # SSE comments while a streamed request waits (loading, queued).
    keepalive_interval_s: float = Field(default=2.0, gt=0)
    # SSE comments on an idle /events stream.
    events_keepalive_s: float = Field(default=15.0, gt=0)
    default_max_tokens: int = Field(default=1024, ge=1)
    # A request body past this is refused (413) before it is read whole: a task's messages
    # travel in the replicated log and in one runner frame (MAX_FRAME_BYTES, 16 MiB). Four
    # MiB of text is about a million tokens, past any model's context.
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=MAX_REQUEST_BYTES)

    @classmethod
    def from_node_config(cls, config: NodeConfig) -> "ApiSettings":
        return cls(
            command_timeout_s=config.command_timeout_s,
            load_timeout_s=config.runner_load_timeout_s,
            stall_timeout_s=config.generation_stall_timeout_s,
            generation_timeout_s=config.generation_timeout_s,
            max_request_bytes=config.max_request_bytes,
        )
