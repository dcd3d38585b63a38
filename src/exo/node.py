"""One exo node: every component in one task group, wired through the router.

On a single machine this node is also the master; the cluster adds peers behind the same
router topics, so nothing here changes shape when it does.
"""

import platform
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from loguru import logger

from exo.api.app import create_app
from exo.api.server import serve_http
from exo.api.settings import ApiSettings
from exo.config import NodeConfig
from exo.identity import load_or_create_node_id
from exo.master.master import Master
from exo.models.cards import KNOWN_CARDS
from exo.models.store import ModelStore
from exo.routing import topics
from exo.routing.emitter import EventEmitter
from exo.routing.router import Router
from exo.routing.streams import StreamHub
from exo.shared.replica import LogReplica
from exo.shared.types.commands import Command, CommandEnvelope, CommandReply, PlaceInstance
from exo.shared.types.events import IndexedEvent, NodeStarted
from exo.shared.types.ids import CommandId, ModelId, NodeId, TaskId, new_command_id
from exo.shared.types.instances import EngineName
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State
from exo.shared.types.stream import StreamMessage
from exo.worker.engines.choice import default_engine
from exo.worker.telemetry.loop import node_telemetry
from exo.worker.worker import Worker


class Node:
    """Implements `exo.api.backend.ApiBackend` for the API it serves."""

    def __init__(self, config: NodeConfig) -> None:
        self._config = config
        self._node_id = load_or_create_node_id(config.data_dir)
        self._session = uuid.uuid4().hex[:8]
        self._replica = LogReplica(
            config.log_path, fsync=config.fsync, snapshot_every=config.snapshot_every
        )
        self._router = Router()
        self._models = ModelStore(config.model_store_dir)
        self._emitter = EventEmitter(
            origin=f"{self._node_id}/{self._session}", router=self._router, replica=self._replica
        )
        self._streams = StreamHub(node_id=self._node_id, router=self._router, replica=self._replica)
        self._reply_waiters: dict[CommandId, MemoryObjectSendStream[CommandReply]] = {}

    # --- ApiBackend -------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._node_id

    def state(self) -> State:
        return self._replica.state

    def model_cards(self) -> Sequence[ModelCard]:
        return list(KNOWN_CARDS.values())

    def model_card(self, model_id: ModelId) -> ModelCard | None:
        return KNOWN_CARDS.get(model_id)

    async def send_command(self, command: Command) -> CommandReply:
        envelope = CommandEnvelope(
            command_id=new_command_id(), origin=self._node_id, command=command
        )
        send, receive = anyio.create_memory_object_stream[CommandReply](1)
        self._reply_waiters[envelope.command_id] = send
        try:
            with receive, anyio.fail_after(self._config.command_timeout_s):
                await self._router.publish(topics.COMMANDS, envelope)
                return await receive.receive()
        finally:
            self._reply_waiters.pop(envelope.command_id, None)
            send.close()

    async def wait_for_state(self, predicate: Callable[[State], bool], timeout_s: float) -> State:
        return await self._replica.wait_for(predicate, timeout_s)

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
        async with self._replica.subscribe(from_index) as events:
            yield events

    # --- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        logger.info(f"node {self._node_id} (session {self._session}) starting")
        shutdown = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._stop_on_signal, shutdown)
                # Every subscriber is in place before anything is published.
                await tg.start(self._replicate)
                await tg.start(self._route_replies)
                await tg.start(self._streams.run)
                await tg.start(self._master().run)
                tg.start_soon(self._emitter.run)
                await self._announce()
                tg.start_soon(self._worker().run)
                # Telemetry (issue 5): device inventory + change-detected metrics events.
                tg.start_soon(node_telemetry(self._node_id, self._emitter, self._config).run)
                await self._preload()
                # Hypercorn must end through its shutdown trigger, not by cancellation.
                await self._serve_api(shutdown)
                logger.info("shutting down")
                tg.cancel_scope.cancel()
        finally:
            self._replica.close()
            logger.info("node stopped; event log closed")

    def _master(self) -> Master:
        return Master(
            origin=f"{self._node_id}/{self._session}/master",
            router=self._router,
            replica=self._replica,
            card_for=KNOWN_CARDS.get,
            default_engine=_default_engine(self._config.engine),
        )

    def _worker(self) -> Worker:
        return Worker(
            node_id=self._node_id,
            replica=self._replica,
            emitter=self._emitter,
            router=self._router,
            models=self._models,
            load_timeout_s=self._config.runner_load_timeout_s,
        )

    async def _announce(self) -> None:
        seq = await self._emitter.emit(
            NodeStarted(
                node_id=self._node_id,
                session=self._session,
                hostname=socket.gethostname(),
                api_port=self._config.api_port or 1,
                started_at_ms=int(time.time() * 1000),
            )
        )
        await self._emitter.wait_indexed(seq, self._config.command_timeout_s)

    async def _preload(self) -> None:
        if self._config.preload_model is None:
            return
        reply = await self.send_command(PlaceInstance(model_id=ModelId(self._config.preload_model)))
        if reply.kind == "rejected":
            logger.error(f"could not place {self._config.preload_model}: {reply.message}")
        else:
            logger.info(f"placing {self._config.preload_model} as {reply.created_id}")

    async def _replicate(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with self._router.subscribe(topics.GLOBAL_EVENTS) as events:
            task_status.started()
            async for event in events:
                await self._replica.ingest([event])

    async def _route_replies(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        with self._router.subscribe(topics.COMMAND_REPLIES) as replies:
            task_status.started()
            async for addressed in replies:
                if addressed.to != self._node_id:
                    continue
                waiter = self._reply_waiters.get(addressed.reply.command_id)
                if waiter is not None:
                    try:
                        waiter.send_nowait(addressed.reply)
                    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # a duplicate reply, or the caller already gave up

    async def _serve_api(self, shutdown: anyio.Event) -> None:
        app = create_app(
            self, self._config.dashboard_dir, ApiSettings.from_node_config(self._config)
        )
        host, port = self._config.api_host, self._config.api_port
        logger.info(f"API listening on http://{host}:{port}")
        await serve_http(app, host, port, shutdown.wait)

    async def _stop_on_signal(self, shutdown: anyio.Event) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                logger.info(f"received {signal.Signals(signum).name}")
                shutdown.set()
                return


def _default_engine(flag: str | None) -> EngineName:
    if flag == "torch" or flag == "mlx":
        return flag
    # An NVIDIA driver exposes /dev/nvidiactl; no need to import torch to find out.
    return default_engine(sys.platform, Path("/dev/nvidiactl").exists(), platform.machine())
