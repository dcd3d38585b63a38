"""Node configuration: every port, path and timeout, from flags and environment."""

import os
from pathlib import Path

from pydantic import Field

from exo.shared.types.base import Frozen

DEFAULT_API_PORT = 52415
DEFAULT_MESH_PORT = 52416
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# The largest request body a node may be set to accept: a task's messages go to the first
# stage's runner in one frame of at most 16 MiB, with the rest of the task beside them.
MAX_REQUEST_BYTES = 8 * 1024 * 1024


def data_dir_default() -> Path:
    home = os.environ.get("EXO_HOME")
    if home:
        return Path(home) / "data"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "exo"


def cache_dir_default() -> Path:
    home = os.environ.get("EXO_HOME")
    if home:
        return Path(home) / "cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "exo"


class NodeConfig(Frozen):
    api_host: str = "0.0.0.0"
    api_port: int = Field(default=DEFAULT_API_PORT, ge=0, lt=65536)
    data_dir: Path
    cache_dir: Path
    dashboard_dir: Path | None = None
    # Model placed at start-up (None: place on the first request).
    preload_model: str | None = None
    # Where models added from the Hugging Face hub come from (a mirror speaks the same
    # HTTP), and the token for gated or private repositories.
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    hf_token: str | None = Field(default=None, repr=False)
    # Serve this node's hub downloads to peers (`/hub/...` on the API port).
    share_models: bool = True
    # Keep hub models' files within this many bytes, removing the least recently used
    # models no instance on the node runs (None: no limit).
    model_store_max_bytes: int | None = Field(default=None, gt=0)
    verbose: bool = False
    # fsync every log batch before it is applied or acked (off only for throwaway tests).
    fsync: bool = True
    snapshot_every: int = Field(default=1000, ge=10)
    command_timeout_s: float = Field(default=10.0, gt=0)
    runner_load_timeout_s: float = Field(default=300.0, gt=0)
    # Added to a request's own budget: a silent runner fails the request, never hangs it.
    generation_stall_timeout_s: float = Field(default=120.0, gt=0)
    # Last-resort bound on one request, queueing behind other requests included.
    generation_timeout_s: float = Field(default=1800.0, gt=0)
    # A request body past this is refused (413). A task's messages travel in the replicated
    # log and in one runner frame (16 MiB), so the bound stays well below that.
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=MAX_REQUEST_BYTES)
    engine: str | None = None
    # Device telemetry: seconds between samples; --profile measures every device.
    telemetry_interval_s: float = Field(default=5.0, gt=0)
    profile_devices: bool = False
    # Seconds between link measurements to each peer (and one on connect).
    link_interval_s: float = Field(default=600.0, gt=0)
    # The cluster (docs/consensus.md, docs/mesh.md).
    mesh_port: int = Field(default=DEFAULT_MESH_PORT, ge=0, lt=65536)
    # Where the mesh listens (None: every interface).
    mesh_host: str | None = None
    peers: tuple[str, ...] = ()  # HOST:PORT of other nodes' meshes (--peer)
    secret: str | None = Field(default=None, repr=False)
    namespace: str = "default"
    discovery: bool = True
    # IP addresses to run mDNS on (empty: every interface).
    discovery_interfaces: tuple[str, ...] = ()
    # Consensus timing (docs/consensus.md): a follower's minimum wait for the master, and
    # the silence after which a member is marked down.
    election_timeout_s: float = Field(default=0.5, ge=0.1, le=60)
    member_timeout_s: float = Field(default=5.0, gt=0)
    # A node that was never in a cluster founds one after this long without finding one.
    bootstrap_wait_s: float = Field(default=2.0, ge=0)

    @property
    def log_path(self) -> Path:
        """The single-node event log of exo before the cluster (migrated once)."""
        return self.data_dir / "events.log"

    @property
    def cluster_dir(self) -> Path:
        return self.data_dir / "cluster"

    @property
    def model_store_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def log_dir(self) -> Path:
        return self.cache_dir / "logs"
