"""The worker: folds plan() over state changes and carries out the actions it returns."""

import os
from pathlib import Path
from typing import Protocol

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from exo.models.convert import NotEnoughDiskSpace
from exo.models.hub import HubError
from exo.models.progress import ConsoleProgress
from exo.routing.router import Router
from exo.shared.types.events import (
    ModelFilesRemoved,
    ModelStoreProgress,
    RunnerEndpointReported,
    RunnerStatusChanged,
)
from exo.shared.types.ids import ModelId, NodeId, RunnerId
from exo.shared.types.runners import RunnerEndpoint, RunnerFailed
from exo.shared.views import EventSink, StateView
from exo.worker.pipeline.links import bind_host, listen_socket
from exo.worker.plan import (
    AbortTask,
    Action,
    DispatchTask,
    LinkStage,
    PruneModel,
    SpawnRunner,
    StopRunner,
    WorkerView,
    files_gone,
    plan,
)
from exo.worker.supervisor import RunnerSupervisor, StageLink

# Model preparation progress is reported at most this often (fraction of the bytes).
_PROGRESS_STEP = 0.1


class ModelPreparer(Protocol):
    def ensure(
        self, model_id: ModelId, on_progress: "ProgressCallback", layers: range | None = None
    ) -> Path:
        """The model's directory with what a stage of `layers` reads (None: every layer)."""
        ...

    def hub_models(self) -> dict[ModelId, Path]: ...

    def remove(self, model_id: ModelId) -> None: ...


class ProgressCallback(Protocol):
    def __call__(self, done: int, total: int, /) -> None: ...


class Worker:
    def __init__(
        self,
        *,
        node_id: NodeId,
        replica: StateView,
        emitter: EventSink,
        router: Router,
        models: ModelPreparer,
        load_timeout_s: float,
        advertise_host: str = "127.0.0.1",
        step_timeout_s: float = 60.0,
        compile_cache: Path | None = None,
    ) -> None:
        self._node_id = node_id
        # Runners keep torch's compiled graphs here (supervisor.runner_env).
        self._compile_cache = compile_cache
        # Where other nodes reach this node's pipeline stages (see pipeline.links).
        self._advertise_host = advertise_host
        self._step_timeout_s = step_timeout_s
        self._replica = replica
        self._emitter = emitter
        self._router = router
        self._models = models
        self._load_timeout_s = load_timeout_s
        self._supervisors: dict[RunnerId, RunnerSupervisor] = {}
        self._spawned: set[RunnerId] = set()
        self._wake = anyio.Event()
        self._prepare_lock = anyio.Lock()
        # Hub models with files in the local store (read at start, then kept up to date).
        self._stored: set[ModelId] = set()
        self._pruning: set[ModelId] = set()

    def _view(self) -> WorkerView:
        dispatched = {
            task_id: runner_id
            for runner_id, sup in self._supervisors.items()
            for task_id in sup.dispatched
        }
        return WorkerView(
            node_id=self._node_id,
            spawned=frozenset(self._spawned),
            alive=frozenset(r for r, s in self._supervisors.items() if s.alive),
            dispatched=dispatched,
            linked=frozenset(r for r, s in self._supervisors.items() if s.linked_to is not None),
            stored=frozenset(self._stored - self._pruning),
        )

    def _poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        self._stored = set(await anyio.to_thread.run_sync(self._models.hub_models))
        await self._report_files_gone("left the store while this node was down")
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._poke_on_state_change)
            try:
                while True:
                    self._wake = anyio.Event()
                    for action in plan(self._replica.state, self._view()):
                        await self._execute(tg, action)
                    await self._wake.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    await self.stop_all()

    async def _poke_on_state_change(self) -> None:
        while True:
            await self._replica.wait_changed()
            self._poke()

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for sup in list(self._supervisors.values()):
                tg.start_soon(sup.stop)

    async def _execute(self, tg: TaskGroup, action: Action) -> None:
        logger.debug(f"worker action: {action}")
        match action:
            case SpawnRunner():
                self._spawned.add(action.shard.runner_id)
                tg.start_soon(self._spawn, action)
            case StopRunner(runner_id=runner_id, reason=reason):
                sup = self._supervisors.get(runner_id)
                if sup is not None:
                    logger.info(f"stopping runner {runner_id}: {reason}")
                    tg.start_soon(sup.stop)
            case DispatchTask(task_id=task_id, runner_id=runner_id):
                task = self._replica.state.tasks.get(task_id)
                sup = self._supervisors.get(runner_id)
                if task is not None and sup is not None:
                    await sup.dispatch(task)
            case AbortTask(task_id=task_id, runner_id=runner_id):
                sup = self._supervisors.get(runner_id)
                if sup is not None:
                    await sup.abort(task_id)
            case LinkStage(runner_id=runner_id, host=host, port=port):
                sup = self._supervisors.get(runner_id)
                if sup is not None:
                    await sup.connect_next(host, port)
            case PruneModel(model_id=model_id):
                self._pruning.add(model_id)
                tg.start_soon(self._prune, model_id)

    async def _spawn(self, action: SpawnRunner) -> None:
        runner_id = action.shard.runner_id
        try:
            shard = action.shard
            layers = range(shard.start_layer, shard.end_layer)
            model_dir = await self._prepare_model(action.model_id, layers)
        except Exception as exc:
            # Out of disk space and hub failures are told in a line; anything else comes with
            # its trace.
            trace = not isinstance(exc, NotEnoughDiskSpace | HubError)
            logger.opt(exception=trace).error(f"could not prepare {action.model_id}: {exc}")
            await self._emitter.emit(
                RunnerStatusChanged(
                    runner_id=runner_id,
                    status=RunnerFailed(reason=f"could not prepare model {action.model_id}: {exc}"),
                )
            )
            return
        link = await self._stage_link(runner_id) if action.pipeline else None
        sup = RunnerSupervisor(
            shard=action.shard,
            model_dir=model_dir,
            emitter=self._emitter,
            router=self._router,
            load_timeout_s=self._load_timeout_s,
            on_change=self._poke,
            link=link,
            cpu_slot=action.cpu_slot,
            cpu_slots=action.cpu_slots,
            compile_cache=self._compile_cache,
        )
        self._supervisors[runner_id] = sup
        try:
            await sup.run()
        finally:
            del self._supervisors[runner_id]
            self._poke()

    async def _stage_link(self, runner_id: RunnerId) -> StageLink:
        """Open a pipeline stage's listening socket and report its port in state; the runner
        inherits the socket and accepts on it before loading, so its neighbours link up while
        it loads (until then their connections wait in the socket's backlog)."""
        sock = listen_socket(bind_host(self._advertise_host))
        port = int(sock.getsockname()[1])
        link = StageLink(listen_fd=sock.detach(), step_timeout_s=self._step_timeout_s)
        endpoint = RunnerEndpoint(node_id=self._node_id, host=self._advertise_host, port=port)
        try:
            await self._emitter.emit(RunnerEndpointReported(runner_id=runner_id, endpoint=endpoint))
        except BaseException:
            os.close(link.listen_fd)
            raise
        return link

    async def _report_files_gone(self, how: str) -> None:
        """`ModelFilesRemoved` for each hub model the state counts this node as holding
        files of while its store holds none. One already reported and not yet applied is
        reported again, which `apply` takes as a no-op."""
        for model_id in files_gone(self._replica.state, self._node_id, frozenset(self._stored)):
            logger.info(f"the files of {model_id} {how}")
            await self._emitter.emit(ModelFilesRemoved(node_id=self._node_id, model_id=model_id))

    async def _prune(self, model_id: ModelId) -> None:
        try:
            async with self._prepare_lock:
                await anyio.to_thread.run_sync(self._models.remove, model_id)
            self._stored.discard(model_id)
            logger.info(f"deleted the files of {model_id}: it left the catalogue")
        except OSError as e:
            logger.error(f"could not delete the files of {model_id}: {e}")
        finally:
            self._pruning.discard(model_id)

    async def _prepare_model(self, model_id: ModelId, layers: range) -> Path:
        """Convert/download the model into the store once; report progress as events."""
        async with self._prepare_lock:
            last = [-1.0]
            console = ConsoleProgress(f"preparing {model_id}")

            def on_progress(done: int, total: int) -> None:
                console(done, total)
                fraction = done / total if total else 1.0
                if fraction < 1.0 and fraction - last[0] < _PROGRESS_STEP:
                    return
                last[0] = fraction
                event = ModelStoreProgress(
                    node_id=self._node_id,
                    model_id=model_id,
                    done_bytes=done,
                    total_bytes=total,
                    complete=done >= total,
                )
                anyio.from_thread.run(self._emitter.emit, event)

            with console:
                try:
                    return await anyio.to_thread.run_sync(
                        self._models.ensure, model_id, on_progress, layers
                    )
                finally:
                    # Even a failed download may have left files (resumed later, or
                    # pruned). A prune cannot run meanwhile: it takes the same lock.
                    held = await anyio.to_thread.run_sync(self._models.hub_models)
                    self._stored = set(held)
                    # What the store removed to stay within its size limit (or someone
                    # deleted): peers stop counting this node as a source of it.
                    await self._report_files_gone("are gone from the store")
