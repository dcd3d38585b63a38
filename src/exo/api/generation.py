"""One chat completion against the cluster: find or place an instance, run the task, relay tokens.

Every wait is bounded (see `ApiSettings`). Failure detection leans on two sources:
- the node sends a `StreamError` when a task fails (its runner died, its instance failed);
- as a backstop, whenever the stream is quiet for `keepalive_interval_s` the state is read:
  a failed or deleted instance, a task that left the state without its stream ending, or a
  running task silent for `stall_timeout_s` each end the request with an error.
"""

from collections.abc import Awaitable, Callable
from typing import Literal

import anyio
from loguru import logger

from exo.api.backend import ApiBackend
from exo.api.errors import ApiError, error_from_rejection
from exo.api.inbox import Inbox, InboxClosed
from exo.api.settings import ApiSettings
from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.commands import (
    CancelTask,
    Command,
    CommandAccepted,
    CommandRejected,
    CreateTask,
    PlaceInstance,
)
from exo.shared.types.ids import InstanceId, ModelId, RunnerId, TaskId
from exo.shared.types.instances import Instance
from exo.shared.types.runners import (
    SERVING_RUNNER_KINDS,
    TERMINAL_RUNNER_KINDS,
    RunnerFailed,
    RunnerLoading,
    RunnerStatus,
)
from exo.shared.types.state import State
from exo.shared.types.stream import StreamEnd, StreamError, StreamMessage, TokenChunk

# Called with a short status ("loading 42%", "queued") whenever a request waits quietly.
OnWait = Callable[[str], Awaitable[None]]
OnToken = Callable[[str], Awaitable[None]]

InstanceStatus = Literal["loading", "serving", "failed"]


class InstanceView(Frozen):
    """An instance with what its runners say about it, for choosing and for GET /instances."""

    instance: Instance
    status: InstanceStatus
    # Mean load progress of its runners in [0, 1]; 1 once serving.
    progress: float
    failed_reason: str | None = None
    runners: dict[RunnerId, RunnerStatus]


def runner_progress(status: RunnerStatus | None) -> float:
    match status:
        case RunnerLoading(progress=progress):
            return progress
        case None:
            return 0.0
        case _ if status.kind in SERVING_RUNNER_KINDS or status.kind == "warming_up":
            return 1.0
        case _:
            return 0.0


def view_instance(state: State, instance: Instance) -> InstanceView:
    runners = {
        s.runner_id: state.runners[s.runner_id]
        for s in instance.shards
        if s.runner_id in state.runners
    }
    statuses = [runners.get(s.runner_id) for s in instance.shards]
    failed_reason = instance.failed_reason
    if failed_reason is None:
        for status in statuses:
            if isinstance(status, RunnerFailed):
                failed_reason = status.reason
                break
            if status is not None and status.kind in TERMINAL_RUNNER_KINDS:
                failed_reason = "a runner of this instance stopped"
                break
    if failed_reason is not None:
        status_: InstanceStatus = "failed"
        progress = 0.0
    elif all(s is not None and s.kind in SERVING_RUNNER_KINDS for s in statuses):
        status_, progress = "serving", 1.0
    else:
        status_ = "loading"
        progress = sum(runner_progress(s) for s in statuses) / len(statuses)
    return InstanceView(
        instance=instance,
        status=status_,
        progress=progress,
        failed_reason=failed_reason,
        runners=runners,
    )


def pick_instance(state: State, model_id: ModelId) -> InstanceView | None:
    """A serving instance of the model (least busy first), else the most-loaded loading one."""
    views = [view_instance(state, i) for i in state.instances.values() if i.model_id == model_id]
    serving = [v for v in views if v.status == "serving"]
    if serving:
        busy = {v.instance.instance_id: 0 for v in serving}
        for task in state.tasks.values():
            if task.instance_id in busy:
                busy[task.instance_id] += 1
        return min(serving, key=lambda v: (busy[v.instance.instance_id], v.instance.instance_id))
    loading = [v for v in views if v.status == "loading"]
    if loading:
        return max(loading, key=lambda v: (v.progress, v.instance.instance_id))
    return None


def task_health(
    state: State,
    task_id: TaskId,
    created_index: int,
    silent_for_s: float,
    settings: ApiSettings,
    instance_id: InstanceId | None = None,
) -> str:
    """What a quiet task is doing ("queued", "generating"), or ApiError when it will not answer.

    `instance_id`: the task's instance when seen earlier; a failed instance drops its tasks
    from the state, so it is what tells a failure from a result still on its way.
    """
    if state.last_index < created_index:
        return "queued"  # this node has not applied the task's creation yet
    task = state.tasks.get(task_id)
    if task is None:
        if instance_id is not None:
            _raise_if_broken(state, instance_id)
        if silent_for_s >= settings.result_grace_s:
            raise ApiError(
                503,
                "The task ended in the cluster but its result never reached this node.",
                code="result_lost",
            )
        return "finishing"
    _raise_if_broken(state, task.instance_id)
    if task.status == "pending":
        return "queued"
    if silent_for_s >= settings.stall_timeout_s:
        raise ApiError(
            504,
            f"No token for {silent_for_s:.0f} s; the generation stalled and was cancelled.",
            code="generation_stalled",
        )
    return "generating"


def _raise_if_broken(state: State, instance_id: InstanceId) -> None:
    instance = state.instances.get(instance_id)
    if instance is None:
        raise ApiError(503, f"Instance {instance_id} was deleted.", code="instance_deleted")
    if instance.failed_reason is not None:
        raise ApiError(
            503, f"Instance {instance_id} failed: {instance.failed_reason}", code="instance_failed"
        )


async def send_command(
    backend: ApiBackend, command: Command, settings: ApiSettings
) -> CommandAccepted:
    """The command's acceptance, or the ApiError its rejection (or silence) maps to."""
    try:
        with anyio.fail_after(settings.command_timeout_s):
            reply = await backend.send_command(command)
    except TimeoutError:
        raise ApiError(
            503,
            f"The master did not answer within {settings.command_timeout_s:g} s.",
            code="master_unavailable",
        ) from None
    if isinstance(reply, CommandRejected):
        raise error_from_rejection(reply)
    return reply


async def wait_applied(backend: ApiBackend, index: int, settings: ApiSettings) -> State:
    """Read-your-writes: wait until this node's state includes the event at `index`."""
    try:
        return await backend.wait_for_state(
            lambda s: s.last_index >= index, settings.command_timeout_s
        )
    except TimeoutError:
        raise ApiError(
            503,
            f"This node did not receive event {index} within {settings.command_timeout_s:g} s.",
            code="state_lagging",
        ) from None


class Placements:
    """Serialises on-demand placement per model on this node, so a burst places one instance."""

    def __init__(self) -> None:
        self._locks: dict[ModelId, anyio.Lock] = {}

    async def serving_instance(
        self,
        backend: ApiBackend,
        model_id: ModelId,
        settings: ApiSettings,
        on_wait: OnWait,
        *,
        trust_local_view: bool = True,
    ) -> InstanceId:
        """An instance of the model that serves; placed and waited for when there is none.

        `trust_local_view=False` asks the master even if this node's state shows one (it
        told us it has none: this node's view lagged behind a failure)."""
        view = pick_instance(backend.state(), model_id) if trust_local_view else None
        if view is not None and view.status == "serving":
            return view.instance.instance_id
        lock = self._locks.setdefault(model_id, anyio.Lock())
        async with lock:
            state = backend.state()
            view = pick_instance(state, model_id) if trust_local_view else None
            if view is None:
                accepted = await send_command(backend, PlaceInstance(model_id=model_id), settings)
                if accepted.created_id is None:
                    raise ApiError(500, "The master placed no instance.", code="placement_failed")
                instance_id = InstanceId(accepted.created_id)
                logger.info(f"placed {instance_id} for {model_id} on demand")
                await wait_applied(backend, accepted.last_index, settings)
            else:
                instance_id = view.instance.instance_id
        await wait_until_serving(backend, instance_id, settings, on_wait)
        return instance_id


async def wait_until_serving(
    backend: ApiBackend, instance_id: InstanceId, settings: ApiSettings, on_wait: OnWait
) -> None:
    deadline = anyio.current_time() + settings.load_timeout_s

    def settled(state: State) -> bool:
        instance = state.instances.get(instance_id)
        return instance is None or view_instance(state, instance).status != "loading"

    while True:
        instance = backend.state().instances.get(instance_id)
        if instance is None:
            raise ApiError(
                503, f"Instance {instance_id} was deleted while loading.", code="instance_deleted"
            )
        view = view_instance(backend.state(), instance)
        if view.status == "serving":
            return
        if view.status == "failed":
            raise ApiError(
                503,
                f"Instance {instance_id} of {instance.model_id} failed to load: {view.failed_reason}",
                code="instance_failed",
            )
        remaining = deadline - anyio.current_time()
        if remaining <= 0:
            raise ApiError(
                504,
                f"{instance.model_id} did not finish loading within {settings.load_timeout_s:g} s.",
                code="model_load_timeout",
            )
        await on_wait(f"loading {round(view.progress * 100)}%")
        try:
            await backend.wait_for_state(settled, min(settings.keepalive_interval_s, remaining))
        except TimeoutError:
            pass


async def serve_task(
    backend: ApiBackend,
    placements: Placements,
    task_id: TaskId,
    model_id: ModelId,
    params: ChatParams,
    settings: ApiSettings,
    on_wait: OnWait,
    on_token: OnToken,
) -> StreamEnd:
    """Find (or place) a serving instance, then run the task on it (see `run_task`).

    In a cluster this node's state trails the master's by a moment: it may still show an
    instance the master already knows has failed, and the master then refuses the task
    (`no_instance`). That case places the model through the master and runs once more."""
    await placements.serving_instance(backend, model_id, settings, on_wait)
    try:
        return await run_task(backend, task_id, model_id, params, settings, on_wait, on_token)
    except ApiError as error:
        if error.code != "no_instance":
            raise
    logger.info(f"{model_id}: the master has no serving instance this node saw; placing")
    await placements.serving_instance(backend, model_id, settings, on_wait, trust_local_view=False)
    return await run_task(backend, task_id, model_id, params, settings, on_wait, on_token)


async def run_task(
    backend: ApiBackend,
    task_id: TaskId,
    model_id: ModelId,
    params: ChatParams,
    settings: ApiSettings,
    on_wait: OnWait,
    on_token: OnToken,
) -> StreamEnd:
    """Create the task and relay its text; the StreamEnd, or ApiError. Cancels what it abandons."""
    async with backend.subscribe_stream(task_id) as stream:
        inbox = Inbox[StreamMessage]()
        error: ApiError | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(inbox.pump, stream)
            try:
                create = CreateTask(
                    task_id=task_id, model_id=model_id, owner=backend.node_id, params=params
                )
                try:
                    accepted = await send_command(backend, create, settings)
                except anyio.get_cancelled_exc_class():
                    await _cancel_quietly(backend, task_id, settings)  # it may have been created
                    raise
                return await _relay(
                    backend, task_id, accepted.last_index, inbox, settings, on_wait, on_token
                )
            except ApiError as e:
                error = e
            finally:
                tg.cancel_scope.cancel()
        assert error is not None  # the try either returned or caught an ApiError
        raise error


class _TaskOver(Exception):
    """The stream reached a terminal message: nothing left to cancel."""

    def __init__(self, error: ApiError) -> None:
        super().__init__(error.message)
        self.error = error


async def _relay(
    backend: ApiBackend,
    task_id: TaskId,
    created_index: int,
    inbox: Inbox[StreamMessage],
    settings: ApiSettings,
    on_wait: OnWait,
    on_token: OnToken,
) -> StreamEnd:
    start = anyio.current_time()
    last_message_at = start
    task = backend.state().tasks.get(task_id)
    instance_id = None if task is None else task.instance_id
    try:
        while True:
            now = anyio.current_time()
            remaining = start + settings.generation_timeout_s - now
            if remaining <= 0:
                raise ApiError(
                    504,
                    f"The request did not finish within {settings.generation_timeout_s:g} s.",
                    code="generation_timeout",
                )
            try:
                message = await inbox.next(min(settings.keepalive_interval_s, remaining))
            except InboxClosed:
                raise ApiError(
                    503, "The token stream closed before the task ended.", code="stream_closed"
                ) from None
            now = anyio.current_time()
            if message is None:
                state = backend.state()
                task = state.tasks.get(task_id)
                if task is not None:
                    instance_id = task.instance_id
                note = task_health(
                    state, task_id, created_index, now - last_message_at, settings, instance_id
                )
                await on_wait(note)
                continue
            if message.task_id != task_id:
                continue
            last_message_at = now
            match message:
                case TokenChunk(text=text):
                    if text:
                        await on_token(text)
                case StreamEnd(finish_reason="cancelled"):
                    raise _TaskOver(
                        ApiError(503, "The generation was cancelled.", code="task_cancelled")
                    )
                case StreamEnd(finish_reason="error"):
                    raise _TaskOver(
                        ApiError(500, "The generation failed.", code="generation_failed")
                    )
                case StreamEnd():
                    return message
                case StreamError(code="context_length_exceeded", message=reason):
                    raise _TaskOver(
                        ApiError(400, reason, code="context_length_exceeded", param="messages")
                    )
                case StreamError(message=reason):
                    raise _TaskOver(ApiError(500, reason, code="generation_failed"))
    except _TaskOver as over:
        raise over.error from None
    except BaseException:
        # Timed out, stalled, the client went away, or a bug: stop the runner working for nobody.
        await _cancel_quietly(backend, task_id, settings)
        raise


async def _cancel_quietly(backend: ApiBackend, task_id: TaskId, settings: ApiSettings) -> None:
    with anyio.CancelScope(shield=True), anyio.move_on_after(settings.command_timeout_s):
        try:
            reply = await backend.send_command(
                CancelTask(task_id=task_id, reason="the API request ended before the task")
            )
            if isinstance(reply, CommandRejected) and reply.code != "not_found":
                logger.warning(f"cancel of {task_id} rejected: {reply.message}")
        except Exception as e:  # best effort: the request is already failing or gone
            logger.warning(f"cancel of {task_id} failed: {e!r}")
