"""One exo node: every component in one task group.

The cluster service (consensus core + durable log + mesh) is the only way state changes:
the worker and telemetry emit local events into it, the API sends commands through it,
and everything reads the committed state from it. On a single machine the node founds a
one-node cluster and is its master; with peers it joins theirs.
"""

import random
import signal
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from loguru import logger

from exo.api.app import create_app
from exo.api.server import serve_http
from exo.api.settings import ApiSettings
from exo.cluster.replace import Replacer
from exo.cluster.service import ClusterService, wire_schema_fingerprint
from exo.cluster.store import ClusterStore
from exo.config import NodeConfig
from exo.identity import load_or_create_node_id
from exo.master.decide import DecideContext, Decision, Rejection, decide
from exo.models.cards import card_in, cards_in
from exo.models.describe import UnsupportedModel, describe
from exo.models.download import GrowingFile
from exo.models.hub import HubClient, HubError, is_repo_id
from exo.models.store import ModelStore
from exo.routing.consensus import ConsensusConfig
from exo.routing.discovery import DiscoveredPeer, Discovery, parse_peer
from exo.routing.mesh import Mesh, MeshConfig
from exo.routing.router import Router
from exo.routing.streams import StreamHub
from exo.shared.listen import listen_tcp
from exo.shared.types.cluster import ClusterStatus
from exo.shared.types.commands import (
    AddModel,
    Command,
    CommandEnvelope,
    CommandRejected,
    CommandReply,
    PlaceInstance,
)
from exo.shared.types.events import IndexedEvent, NodeStarted
from exo.shared.types.ids import (
    ModelId,
    NodeId,
    TaskId,
    new_command_id,
    new_instance_id,
    new_runner_id,
)
from exo.shared.types.instances import EngineName
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State
from exo.shared.types.stream import StreamMessage
from exo.worker.engines.choice import this_machines_engine
from exo.worker.pipeline.links import advertised_host
from exo.worker.telemetry.link_loop import LinkProber
from exo.worker.telemetry.loop import node_telemetry
from exo.worker.worker import Worker


class Node:
    """Implements `exo.api.backend.ApiBackend` for the API it serves."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._node_id = load_or_create_node_id(config.data_dir)
        self._session = uuid.uuid4().hex[:8]
        self._store = ClusterStore(config.cluster_dir, fsync=config.fsync)
        try:
            self._store.migrate_single_node_log(config.log_path, self._node_id, uuid.uuid4().hex)
            self._router = Router()
            self._models = ModelStore(
                config.model_store_dir,
                # Read from the worker's thread: the state is an immutable value.
                card_for=lambda model_id: card_in(self._cluster.state, model_id),
                hub_endpoint=config.hf_endpoint,
                hub_token=config.hf_token,
                peers_for=self._peers_from_thread,
                max_bytes=config.model_store_max_bytes,
                in_use=lambda: models_on(self._cluster.state, self._node_id),
            )
            self._mesh = Mesh(
                MeshConfig(
                    node_id=self._node_id,
                    namespace=config.namespace,
                    host=config.mesh_host,
                    port=config.mesh_port,
                    secret=config.secret,
                    schema_fingerprint=wire_schema_fingerprint(),
                )
            )
            self._engine: EngineName = _default_engine(config.engine)
            self._cluster = ClusterService(
                node_id=self._node_id,
                session=self._session,
                store=self._store,
                mesh=self._mesh,
                router=self._router,
                decide=self._decide,
                config=_consensus_config(config),
                bootstrap_wait_s=config.bootstrap_wait_s,
                rng=random.Random(),
            )
        except BaseException:
            self._store.close()
            raise
        self._streams = StreamHub(node_id=self._node_id, router=self._router, replica=self._cluster)
        self._discovery: Discovery | None = None  # while mDNS runs

    # --- ApiBackend -------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    def state(self) -> State:
        return self._cluster.state

    def cluster_status(self) -> ClusterStatus:
        status = self._cluster.status()
        discovery = self._discovery
        seen = {} if discovery is None else discovery.other_versions()
        if not seen:
            return status
        # Nodes of this namespace on another protocol version are never dialled: say so.
        mdns = {f"{node_id} (mDNS)": f"version: {why}" for node_id, why in seen.items()}
        return status.model_copy(update={"refused": {**status.refused, **mdns}})

    def model_cards(self) -> Sequence[ModelCard]:
        return cards_in(self._cluster.state)

    def model_card(self, model_id: ModelId) -> ModelCard | None:
        return card_in(self._cluster.state, model_id)

    def model_file(self, repo: str, commit: str, path: str) -> Path | None:
        if not self._config.share_models:
            return None
        return self._models.served_file(repo, commit, path)

    def model_part(self, repo: str, commit: str, path: str) -> GrowingFile | None:
        if not self._config.share_models:
            return None
        return self._models.served_part(repo, commit, path)

    def model_listing(self, repo: str, commit: str) -> bytes | None:
        if not self._config.share_models:
            return None
        return self._models.served_listing(repo, commit)

    def _peers_from_thread(self, model_id: ModelId) -> list[str]:
        """`_peers_holding` for the store, which the worker runs in a thread: the mesh and
        the state are read on the event loop."""
        try:
            return anyio.from_thread.run_sync(self._peers_holding, model_id)
        except RuntimeError:  # not one of anyio's worker threads: the hub alone
            logger.debug(f"{model_id}: prepared outside the worker; no peers asked")
            return []

    def _peers_holding(self, model_id: ModelId) -> list[str]:
        """Where this node can fetch a hub model's files from its peers (`model_sources`):
        the `/hub` routes of connected nodes, at the address the mesh connection comes from."""
        reachable: dict[NodeId, tuple[str, float]] = {}
        for node_id, peer in self._mesh.peers().items():
            rtt = peer.rtt_s if peer.rtt_s is not None else float("inf")
            reachable[node_id] = (peer.remote[0], rtt)
        return model_sources(self._cluster.state, self._node_id, model_id, reachable)

    async def describe_hub_model(self, repo: str, revision: str) -> ModelCard:
        def read() -> ModelCard:
            with HubClient(self._config.hf_endpoint, self._config.hf_token) as client:
                return describe(client, repo, revision)

        return await anyio.to_thread.run_sync(read)

    async def send_command(self, command: Command) -> CommandReply:
        envelope = CommandEnvelope(
            command_id=new_command_id(), origin=self._node_id, command=command
        )
        # The core answers within its own bound (rejecting when no master shows up);
        # this outer bound only guards against a bug.
        bound = self._config.command_timeout_s + 5.0
        try:
            return await self._cluster.send_command(envelope, bound)
        except TimeoutError:
            return CommandRejected(
                command_id=envelope.command_id,
                code="unavailable",
                message=f"no answer from the master within {bound:.0f} s",
            )

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        return await self._cluster.wait_for(predicate, timeout_s)

    @asynccontextmanager
    async def subscribe_stream(
        self, task_id: TaskId
    ) -> AsyncGenerator[MemoryObjectReceiveStream[StreamMessage]]:
        async with self._streams.subscribe(task_id) as stream:
            yield stream

    @asynccontextmanager
    async def subscribe_events(
        self, from_index: int
    ) -> AsyncGenerator[MemoryObjectReceiveStream[IndexedEvent]]:
        async with self._cluster.subscribe(from_index) as events:
            yield events

    # --- the master's decision (runs on whichever node is master) ----------------------

    def _decide(self, state: State, envelope: CommandEnvelope) -> Decision | Rejection:
        ctx = DecideContext(
            now_ms=int(time.time() * 1000),
            new_instance_id=new_instance_id(),
            new_runner_ids=[new_runner_id() for _ in range(64)],
            default_engine=self._engine,
        )
        return decide(state, envelope, lambda model_id: card_in(state, model_id), ctx)

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        logger.info(f"node {self._node_id} (session {self._session}) starting")
        shutdown = anyio.Event()
        api_socket: socket.socket | None = None
        try:
            # Bound first: a taken port is one clear error before anything else starts.
            api_socket = listen_tcp("the API", self._config.api_host, self._config.api_port)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, shutdown)
                mesh_port = await tg.start(self._mesh.run)
                for text in self._config.peers:
                    peer = parse_peer(text, default_port=self._config.mesh_port)
                    self._mesh.add_peer(peer.host, peer.port)
                if self._config.discovery:
                    await tg.start(self._discover, mesh_port)
                prober = LinkProber(
                    node_id=self._node_id,
                    sink=self._cluster,
                    targets=self._cluster.probe_targets,
                    host=self._config.mesh_host,
                    interval_s=self._config.link_interval_s,
                )
                self._cluster.probe_port = await tg.start(prober.serve)
                # Every subscriber is in place before anything is published.
                failures: list[Exception] = []
                await tg.start(self._run_cluster, shutdown, failures)
                await tg.start(self._streams.run)
                await self._announce()
                # Telemetry (issue 5): device inventory + change-detected metrics events. Its
                # first inventory measures the devices before any runner of this node loads
                # (a runner compiling on the same cores made the CPU's compute figure 12x low).
                await tg.start(
                    node_telemetry(self._node_id, self._cluster, self._config, self._engine).run
                )
                tg.start_soon(self._worker().run)
                tg.start_soon(prober.run)
                replacer = Replacer(
                    view=self._cluster,
                    is_master=lambda: self._cluster.is_master,
                    send_command=self.send_command,
                )
                tg.start_soon(replacer.run)
                tg.start_soon(self._preload)
                # Hypercorn must end through its shutdown trigger, not by cancellation.
                await self._serve_api(shutdown, api_socket)
                if failures:
                    tg.cancel_scope.cancel()
                    raise failures[0]
                logger.info("shutting down")
                await self._leave_cluster()
                tg.cancel_scope.cancel()
        finally:
            if api_socket is not None:
                api_socket.close()  # a no-op once the server took it
            self._store.close()
            logger.info("node stopped; event log closed")

    async def _discover(
        self, mesh_port: int, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        def found(peer: DiscoveredPeer) -> None:
            logger.info(f"discovered {peer.node_id} at {peer.host}:{peer.mesh_port}")
            self._mesh.add_peer(peer.host, peer.mesh_port)

        interfaces = list(self._config.discovery_interfaces) or None
        discovery = Discovery(
            node_id=self._node_id,
            namespace=self._config.namespace,
            mesh_port=mesh_port,
            api_port=self._config.api_port or 1,
            on_peer=found,
            interfaces=interfaces,
            ipv4_only=interfaces is not None and all(":" not in i for i in interfaces),
        )
        self._discovery = discovery
        await discovery.run(task_status=task_status)

    def _worker(self) -> Worker:
        return Worker(
            node_id=self._node_id,
            replica=self._cluster,
            emitter=self._cluster,
            router=self._router,
            models=self._models,
            load_timeout_s=self._config.runner_load_timeout_s,
            # Where other nodes reach this node's pipeline stages: the mesh's address when
            # it is bound to one, else the API's, else the first non-loopback IPv4.
            advertise_host=advertised_host(self._config.mesh_host or self._config.api_host),
            compile_cache=self._config.cache_dir / "torchinductor",
        )

    async def _announce(self) -> None:
        seq = await self._cluster.emit(
            NodeStarted(
                node_id=self._node_id,
                session=self._session,
                hostname=socket.gethostname(),
                api_port=self._config.api_port or 1,
                started_at_ms=int(time.time() * 1000),
            )
        )
        # Without a master (a member restarting while the others are away) the node still
        # serves its last known state; the announcement lands once a master is there.
        try:
            await self._cluster.wait_indexed(seq, self._config.command_timeout_s)
        except TimeoutError:
            logger.warning(
                "no master has indexed this node's start yet (no quorum reachable?); "
                "serving the last known state meanwhile"
            )

    async def _preload(self) -> None:
        model = self._config.preload_model
        if model is None:
            return
        if self.model_card(ModelId(model)) is None and is_repo_id(model):
            try:
                card = await self.describe_hub_model(model, "main")
            except (HubError, UnsupportedModel) as e:
                logger.error(f"could not add {model} from the hub: {e}")
                return
            added = await self.send_command(AddModel(card=card))
            if added.kind == "rejected":
                logger.error(f"could not add {model}: {added.message}")
                return
        reply = await self.send_command(PlaceInstance(model_id=ModelId(model)))
        if reply.kind == "rejected":
            logger.error(f"could not place {self._config.preload_model}: {reply.message}")
        else:
            logger.info(f"placing {self._config.preload_model} as {reply.created_id}")

    async def _leave_cluster(self) -> None:
        """A member that stops on purpose leaves the voters, so the others keep a quorum
        (two nodes survive one leaving); it joins again when it comes back. The last
        voter stays: its cluster would have no member left to let anyone in."""
        voters = self._cluster.status().voters
        if self._node_id not in voters or len(voters) < 2:
            return
        self._cluster.leave()
        try:
            await self._cluster.wait_for(
                lambda s: (info := s.nodes.get(self._node_id)) is None or info.status == "down",
                3.0,
            )
            logger.info("left the cluster")
        except TimeoutError:
            logger.warning("could not leave the cluster in time; the others will time us out")

    async def _serve_api(self, shutdown: anyio.Event, sock: socket.socket) -> None:
        app = create_app(
            self, self._config.dashboard_dir, ApiSettings.from_node_config(self._config)
        )
        host, port = self._config.api_host, self._config.api_port
        logger.info(f"API listening on http://{host}:{port}")
        await serve_http(app, sock, shutdown.wait)

    async def _run_cluster(
        self,
        shutdown: anyio.Event,
        failures: list[Exception],
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """The cluster service. Once it has started, its failure (its log cannot be written)
        stops the node in order: the API ends through its shutdown trigger (Hypercorn must
        not be cancelled), then `run` raises the failure."""
        status = _StatusRelay(task_status)
        try:
            await self._cluster.run(task_status=status)
        except Exception as exc:
            if not status.done:
                raise
            failures.append(exc)
            shutdown.set()

    async def _stop_on_signal(self, shutdown: anyio.Event) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info(f"received {signal.Signals(signum).name}")
                shutdown.set()
                return


class _StatusRelay:
    """Passes a task's start on to `status` (anyio's `TaskStatus`) and remembers it."""

    def __init__(self, status: anyio.abc.TaskStatus[None]) -> None:
        self._status = status
        self.done = False

    def started(self, value: None = None) -> None:
        self.done = True
        self._status.started(value)


def _consensus_config(config: NodeConfig) -> ConsensusConfig:
    tick_ms = ConsensusConfig.tick_ms
    election = max(2, round(config.election_timeout_s * 1000 / tick_ms))
    return ConsensusConfig(
        tick_ms=tick_ms,
        heartbeat_ticks=max(1, election // 5),
        election_ticks=election,
        member_timeout_ticks=max(2 * election + 1, round(config.member_timeout_s * 1000 / tick_ms)),
        command_timeout_ticks=max(1, round(config.command_timeout_s * 1000 / tick_ms)),
        snapshot_every=config.snapshot_every,
    )


def models_on(state: State, node_id: NodeId) -> frozenset[ModelId]:
    """The models that instances run a stage of on `node_id`."""
    return frozenset(
        instance.model_id
        for instance in state.instances.values()
        if any(shard.node_id == node_id for shard in instance.shards)
    )


def model_sources(
    state: State,
    me: NodeId,
    model_id: ModelId,
    reachable: Mapping[NodeId, tuple[str, float]],
) -> list[str]:
    """The peers to ask for a hub model's files before the hub, as `/hub` base URLs.

    First the peers whose store finished preparing the model (for their stage: one that
    lacks a file answers 404 and the next source serves it), nearest first. Then the peers
    fetching it now (a download under way, or a stage of it assigned), which serve each
    file as it arrives; only those whose id sorts before this node's, so that of the nodes
    fetching a model together one goes to the hub and each other follows a node before
    it, never in a ring. `reachable` maps each connected peer to its host and mesh RTT.
    """
    assigned = {
        shard.node_id
        for instance in state.instances.values()
        if instance.model_id == model_id
        for shard in instance.shards
    }
    found: list[tuple[int, float, str]] = []
    for node_id, (host, rtt) in reachable.items():
        info = state.nodes.get(node_id)
        if info is None or info.status != "up":
            continue
        progress = state.model_progress.get(f"{node_id}/{model_id}")
        if progress is not None and progress.complete:
            rank = 0
        elif node_id < me and (progress is not None or node_id in assigned):
            rank = 1
        else:
            continue
        host = f"[{host}]" if ":" in host else host
        found.append((rank, rtt, f"http://{host}:{info.api_port}/hub"))
    return [url for _rank, _rtt, url in sorted(found)]


def _default_engine(flag: str | None) -> EngineName:
    if flag == "torch" or flag == "mlx":
        return flag
    return this_machines_engine()
