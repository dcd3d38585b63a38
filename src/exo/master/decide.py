"""The master's pure half: a command and the state in, events and a reply out."""

from collections.abc import Callable

from exo.master.manual_split import SplitRejected, validate_manual_split
from exo.master.placement import PlacementError, auto_place, cost_manual_split
from exo.shared.types.base import Frozen
from exo.shared.types.commands import (
    AddModel,
    CancelTask,
    CommandEnvelope,
    CreateTask,
    DeleteInstance,
    PlaceInstance,
    RejectionCode,
    RemoveModel,
)
from exo.shared.types.events import (
    Event,
    InstanceCreated,
    InstanceDeleted,
    ModelAdded,
    ModelRemoved,
    TaskCancelled,
    TaskCreated,
)
from exo.shared.types.ids import InstanceId, ModelId, RunnerId
from exo.shared.types.instances import EngineName, Instance
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State
from exo.shared.types.tasks import Task


class Decision(Frozen):
    events: tuple[Event, ...] = ()
    created_id: str | None = None


class Rejection(Frozen):
    code: RejectionCode
    message: str


class DecideContext(Frozen):
    """Everything impure the decision needs, fixed by the caller (ids, clock, catalogue)."""

    now_ms: int
    new_instance_id: InstanceId
    new_runner_ids: list[RunnerId]
    default_engine: EngineName


def decide(
    state: State,
    envelope: CommandEnvelope,
    card_for: Callable[[ModelId], ModelCard | None],
    ctx: DecideContext,
) -> Decision | Rejection:
    command = envelope.command
    match command:
        case PlaceInstance():
            card = card_for(command.model_id)
            if card is None:
                return Rejection(code="unknown_model", message=f"unknown model {command.model_id}")
            if command.context_length is not None and command.context_length > card.context_length:
                return Rejection(
                    code="invalid",
                    message=f"context_length {command.context_length} is above the "
                    f"{card.context_length}-token context of {card.model_id}",
                )
            return _place(state, command, card, ctx)
        case DeleteInstance(instance_id=instance_id):
            if instance_id not in state.instances:
                return Rejection(code="not_found", message=f"no instance {instance_id}")
            event = InstanceDeleted(instance_id=instance_id, reason="deleted by request")
            return Decision(events=(event,), created_id=instance_id)
        case CreateTask():
            if card_for(command.model_id) is None:
                return Rejection(code="unknown_model", message=f"unknown model {command.model_id}")
            instance = serving_instance(state, command.model_id)
            if instance is None:
                return Rejection(
                    code="no_instance", message=f"no running instance of {command.model_id}"
                )
            task = Task(
                task_id=command.task_id,
                instance_id=instance.instance_id,
                owner=command.owner,
                params=command.params,
                created_at_ms=ctx.now_ms,
            )
            return Decision(events=(TaskCreated(task=task),), created_id=command.task_id)
        case CancelTask(task_id=task_id, reason=reason):
            if task_id not in state.tasks:
                return Decision()  # already over: cancelling is idempotent
            return Decision(events=(TaskCancelled(task_id=task_id, reason=reason),))
        case AddModel(card=card):
            known = card_for(card.model_id)
            if known == card:
                return Decision(created_id=card.model_id)  # adding is idempotent
            if known is not None and known.model_id not in state.models:
                return Rejection(
                    code="invalid", message=f"{card.model_id} is built in and cannot be replaced"
                )
            return Decision(events=(ModelAdded(card=card),), created_id=card.model_id)
        case RemoveModel(model_id=model_id):
            if model_id not in state.models:
                if card_for(model_id) is not None:
                    return Rejection(
                        code="invalid", message=f"{model_id} is built in and cannot be removed"
                    )
                return Rejection(code="unknown_model", message=f"unknown model {model_id}")
            using = sorted(
                i.instance_id for i in state.instances.values() if i.model_id == model_id
            )
            if using:
                return Rejection(
                    code="invalid",
                    message=f"{model_id} still has instances ({', '.join(using)}): delete them first",
                )
            return Decision(events=(ModelRemoved(model_id=model_id),), created_id=model_id)


def serving_instance(state: State, model_id: ModelId) -> Instance | None:
    """The healthy instance of a model with the fewest tasks in flight."""
    candidates = [
        i for i in state.instances.values() if i.model_id == model_id and i.failed_reason is None
    ]
    if not candidates:
        return None
    in_flight = {i.instance_id: 0 for i in candidates}
    for task in state.tasks.values():
        if task.instance_id in in_flight:
            in_flight[task.instance_id] += 1
    return min(candidates, key=lambda i: (in_flight[i.instance_id], i.created_at_ms))


def _place(
    state: State, command: PlaceInstance, card: ModelCard, ctx: DecideContext
) -> Decision | Rejection:
    existing = serving_instance(state, command.model_id)
    if existing is not None and command.node_id is None and command.stages is None:
        return Decision(created_id=existing.instance_id)  # placing is idempotent per model
    # A failed instance of the model only holds memory: clear it before placing anew.
    cleanup: list[Event] = [
        InstanceDeleted(
            instance_id=i.instance_id, reason=f"replaced after failure: {i.failed_reason}"
        )
        for i in state.instances.values()
        if i.model_id == command.model_id and i.failed_reason is not None
    ]
    if command.stages is not None:
        # The manual branch: the user's split, validated (exo.master.manual_split), then
        # costed by the solver's model where telemetry allows; refused if it does not fit.
        shards = validate_manual_split(card, state, command.stages, ctx.new_runner_ids)
        if isinstance(shards, SplitRejected):
            return Rejection(code="invalid_split", message=shards.describe())
        costed = cost_manual_split(card, state, command, ctx.default_engine)
        if isinstance(costed, PlacementError):
            return Rejection(code="placement_failed", message=costed.reason)
        instance = Instance(
            instance_id=ctx.new_instance_id,
            model_id=command.model_id,
            shards=shards,
            created_at_ms=ctx.now_ms,
            prediction=costed,
        )
        return Decision(
            events=(*cleanup, InstanceCreated(instance=instance)), created_id=instance.instance_id
        )
    # The automatic branch: the CP-SAT solver over the state's devices and links.
    placed = auto_place(card, state, command, ctx.new_runner_ids, ctx.default_engine)
    if isinstance(placed, PlacementError):
        return Rejection(code="placement_failed", message=placed.reason)
    instance = Instance(
        instance_id=ctx.new_instance_id,
        model_id=command.model_id,
        shards=placed.shards,
        created_at_ms=ctx.now_ms,
        prediction=placed.prediction,
    )
    return Decision(
        events=(*cleanup, InstanceCreated(instance=instance)), created_id=instance.instance_id
    )
