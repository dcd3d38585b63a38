"""The HTTP API: OpenAI chat, text completions and responses; the cluster API; SSE of the
event log; the dashboard.

Everything it knows of the node comes through `ApiBackend`; see docs/api.md for the endpoints.
"""

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route

from exo.api.backend import ApiBackend
from exo.api.dashboard import mount_dashboard
from exo.api.errors import (
    ApiError,
    above_context,
    error_from_validation,
    error_from_validation_error,
    model_not_found,
)
from exo.api.generation import (
    InstanceView,
    Placements,
    send_command,
    serve_task,
    view_instance,
    wait_applied,
)
from exo.api.inbox import Inbox, InboxClosed
from exo.api.openai_responses import (
    ResponseEvents,
    ResponsesRequest,
    response_object,
    responses_params,
)
from exo.api.openai_types import (
    AddModelRequest,
    ChatCompletionRequest,
    CompletionRequest,
    PlaceInstanceRequest,
)
from exo.api.peer_files import HeldFile, growing_response
from exo.api.placement import preview_for_state
from exo.api.responses import EventStreamResponse, SSEChannel, WatchedResponse
from exo.api.settings import ApiSettings
from exo.api.translate import (
    ChunkBuilder,
    StreamChunks,
    TextChunkBuilder,
    chat_completion,
    chat_params,
    completion_params,
    model_list,
    model_object,
    reply_id,
    text_completion,
)
from exo.models.describe import UnsupportedModel
from exo.models.hub import HubDenied, HubError, HubNotFound, check_repo_id, is_repo_id
from exo.shared.types.base import Frozen
from exo.shared.types.chat import ChatParams
from exo.shared.types.cluster import ClusterStatus
from exo.shared.types.commands import (
    AddModel,
    DeleteInstance,
    PinnedStage,
    PlaceInstance,
    RemoveModel,
)
from exo.shared.types.events import IndexedEvent
from exo.shared.types.ids import InstanceId, ModelId, NodeId, TaskId, new_task_id
from exo.shared.types.models import ModelCard
from exo.shared.types.state import State
from exo.shared.types.stream import StreamEnd

M = TypeVar("M", bound=BaseModel)


class StateResponse(Frozen):
    node_id: NodeId
    # The current master and term as this node knows them (None: an election is on).
    master: NodeId | None
    term: int
    # This node's last applied (committed and durable) index and the hash of that state.
    last_index: int
    state_hash: str
    cluster: ClusterStatus
    state: State


class InstanceList(Frozen):
    object: str = "list"
    data: tuple[InstanceView, ...]


class InstancePlaced(Frozen):
    instance_id: InstanceId
    model: ModelId
    last_index: int


class ModelRemovedReply(Frozen):
    model_id: ModelId
    removed: bool = True
    last_index: int


class InstanceDeletedReply(Frozen):
    instance_id: InstanceId
    deleted: bool = True
    last_index: int


_REF_TEMPLATE = "#/components/schemas/{model}"


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """OpenAPI body for endpoints that parse their JSON themselves (any content type, 400 vs 422)."""
    schema = model.model_json_schema(ref_template=_REF_TEMPLATE)
    schema.pop("$defs", None)  # hoisted into components by `_with_body_schemas`
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _with_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add the self-parsed body models' nested schemas to the OpenAPI components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                defs = model.model_json_schema(ref_template=_REF_TEMPLATE).get("$defs", {})
                components.update(defs)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it is past `limit` bytes (before reading it all)."""
    too_large = ApiError(
        413,
        f"The request body is larger than this API accepts ({limit} bytes).",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_body(request: Request, model: type[M], limit: int) -> M:
    body = await _read_body(request, limit)
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise error_from_validation_error(e) from None


def create_app(
    backend: ApiBackend, dashboard_dir: Path | None, settings: ApiSettings | None = None
) -> FastAPI:
    settings = settings or ApiSettings()
    placements = Placements()
    app = FastAPI(title="exo", summary="OpenAI-compatible API of an exo cluster")
    app.add_middleware(
        CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"]
    )

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> Response:  # pyright: ignore[reportUnusedFunction]
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, exc: RequestValidationError) -> Response:  # pyright: ignore[reportUnusedFunction]
        return error_from_validation(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:  # pyright: ignore[reportUnusedFunction]
        if exc.status_code in (404, 405) and (allowed := _methods_of_path(app, request)):
            # The dashboard's files are mounted at "/" and answer every path no route
            # takes, so a known API path asked with the wrong method lands there, as a 404
            # (GET) or with the files' own methods (any other).
            methods = ", ".join(allowed)
            error = ApiError(
                405,
                f"{request.method} is not allowed on {request.url.path}; use {methods}.",
                code="method_not_allowed",
            )
            response = error.response()
            response.headers["Allow"] = methods
            return response
        if exc.status_code == 405 or (exc.status_code == 404 and request.method != "GET"):
            # No route takes the path; the dashboard's files refused the method.
            return ApiError(
                404,
                f"There is no {request.method} {request.url.path}; GET /docs lists the API"
                " (chat completions: POST /v1/chat/completions).",
                code="not_found",
            ).response()
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    # --- OpenAI ----------------------------------------------------------------------

    def answer(
        task_id: TaskId,
        model_id: ModelId,
        params: ChatParams,
        chunks: StreamChunks | None,
        whole: Callable[[str, StreamEnd], Frozen],
    ) -> Response:
        """Serve a generation as a stream of `chunks`, or (None) as one `whole` reply."""
        if chunks is not None:
            return EventStreamResponse(
                lambda channel: _stream(
                    backend, placements, settings, task_id, model_id, params, chunks, channel
                )
            )

        async def complete() -> Response:
            text, end = await _generate(backend, placements, settings, task_id, model_id, params)
            return JSONResponse(whole(text, end).model_dump(mode="json"))

        return WatchedResponse(complete)

    @app.post(
        "/v1/chat/completions",
        response_model=None,
        openapi_extra=_schema(ChatCompletionRequest),
        tags=["openai"],
    )
    async def chat_completions(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        chat = await _parse_body(request, ChatCompletionRequest, settings.max_request_bytes)
        card = await _card_or_hub(backend, settings, chat.model)
        params = chat_params(chat, card, settings.default_max_tokens)
        task_id = new_task_id()
        created = int(time.time())
        chunks = ChunkBuilder(
            completion_id=task_id,
            model=card.model_id,
            created=created,
            include_usage=chat.include_usage,
        )
        return answer(
            task_id,
            card.model_id,
            params,
            chunks if chat.stream else None,
            lambda text, end: chat_completion(task_id, card.model_id, created, text, end),
        )

    @app.post(
        "/v1/completions",
        response_model=None,
        openapi_extra=_schema(CompletionRequest),
        tags=["openai"],
    )
    async def completions(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        asked = await _parse_body(request, CompletionRequest, settings.max_request_bytes)
        card = await _card_or_hub(backend, settings, asked.model)
        params = completion_params(asked, card)
        echo = params.prompt if asked.echo and params.prompt is not None else ""
        task_id = new_task_id()
        created = int(time.time())
        completion_id = reply_id("cmpl-", task_id)
        chunks = TextChunkBuilder(
            completion_id=completion_id,
            model=card.model_id,
            created=created,
            include_usage=asked.include_usage,
            echo=echo,
        )
        return answer(
            task_id,
            card.model_id,
            params,
            chunks if asked.stream else None,
            lambda text, end: text_completion(
                completion_id, card.model_id, created, echo + text, end
            ),
        )

    @app.post(
        "/v1/responses",
        response_model=None,
        openapi_extra=_schema(ResponsesRequest),
        tags=["openai"],
    )
    async def responses(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        asked = await _parse_body(request, ResponsesRequest, settings.max_request_bytes)
        card = await _card_or_hub(backend, settings, asked.model)
        params = responses_params(asked, card, settings.default_max_tokens)
        task_id = new_task_id()
        created = int(time.time())
        return answer(
            task_id,
            card.model_id,
            params,
            ResponseEvents(task_id, asked, params, card.model_id, created)
            if asked.stream
            else None,
            lambda text, end: response_object(
                task_id, asked, params, card.model_id, created, text, end
            ),
        )

    @app.get("/v1/models", tags=["openai"])
    async def list_models() -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        return model_list(backend.model_cards()).model_dump(mode="json")

    @app.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str) -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        card = backend.model_card(ModelId(model_id))
        if card is None:
            raise model_not_found(model_id)
        return model_object(card).model_dump(mode="json")

    @app.post(
        "/models",
        status_code=201,
        response_model=None,
        openapi_extra=_schema(AddModelRequest),
        tags=["cluster"],
    )
    async def add_model(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        body = await _parse_body(request, AddModelRequest, settings.max_request_bytes)
        card = await _describe(backend, body.repo, body.revision, "repo")
        known = backend.model_card(card.model_id)
        await _add(backend, settings, card)
        status = 200 if known == card else 201
        return JSONResponse(card.model_dump(mode="json"), status_code=status)

    @app.delete("/models/{model_id:path}", tags=["cluster"])
    async def remove_model(model_id: str) -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        accepted = await send_command(backend, RemoveModel(model_id=ModelId(model_id)), settings)
        await wait_applied(backend, accepted.last_index, settings)
        return ModelRemovedReply(
            model_id=ModelId(model_id), last_index=accepted.last_index
        ).model_dump(mode="json")

    # --- cluster ---------------------------------------------------------------------

    @app.get("/healthz", tags=["cluster"])
    async def healthz() -> dict[str, str]:  # pyright: ignore[reportUnusedFunction]
        return {"status": "ok", "node_id": backend.node_id}

    @app.get("/cluster", tags=["cluster"], response_model=None)
    async def get_cluster() -> Response:  # pyright: ignore[reportUnusedFunction]
        """This node's own view of its cluster (`/state`'s `cluster`, without the state):
        small enough to poll."""
        return Response(backend.cluster_status().model_dump_json(), media_type="application/json")

    @app.get("/state", tags=["cluster"], response_model=None)
    async def get_state() -> Response:  # pyright: ignore[reportUnusedFunction]
        state = backend.state()
        cluster = backend.cluster_status()
        body = StateResponse(
            node_id=backend.node_id,
            master=cluster.master,
            term=cluster.term,
            cluster=cluster,
            last_index=state.last_index,
            state_hash=state.state_hash(),
            state=state,
        )
        return Response(body.model_dump_json(), media_type="application/json")

    @app.get("/placement/preview", tags=["cluster"], response_model=None)
    async def placement_preview(  # pyright: ignore[reportUnusedFunction]
        model: str = Query(min_length=1),
        context: int | None = Query(default=None, ge=1),
    ) -> Response:
        # A GET changes nothing: a hub model not added yet is read, not added.
        card = await _card_or_hub(backend, settings, model, add=False)
        if context is not None and context > card.context_length:
            raise above_context("context", context, card.model_id, card.context_length)
        result = await anyio.to_thread.run_sync(preview_for_state, card, backend.state(), context)
        return Response(result.model_dump_json(), media_type="application/json")

    @app.get("/events", tags=["cluster"], response_model=None)
    async def events(  # pyright: ignore[reportUnusedFunction]
        from_index: int | None = Query(default=None, alias="from", ge=0),
        last_event_id: str | None = Header(default=None),
    ) -> Response:
        start = _events_start(backend.state(), from_index, last_event_id)

        async def produce(channel: SSEChannel) -> None:
            async with backend.subscribe_events(start) as stream:
                await channel.start()
                inbox = Inbox[IndexedEvent]()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(inbox.pump, stream)
                    try:
                        while True:
                            event = await inbox.next(settings.events_keepalive_s)
                            if event is None:
                                await channel.comment("keep-alive")
                            else:
                                await channel.data(event.model_dump_json(), event_id=event.index)
                    except InboxClosed:
                        pass
                    finally:
                        tg.cancel_scope.cancel()

        return EventStreamResponse(produce)

    @app.get("/instances", tags=["cluster"])
    async def list_instances() -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        state = backend.state()
        views = tuple(
            view_instance(state, i)
            for i in sorted(state.instances.values(), key=lambda i: i.created_at_ms)
        )
        return InstanceList(data=views).model_dump(mode="json")

    @app.get("/instances/{instance_id}", tags=["cluster"])
    async def get_instance(instance_id: str) -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        state = backend.state()
        instance = state.instances.get(InstanceId(instance_id))
        if instance is None:
            raise ApiError(
                404, f"No instance {instance_id}.", code="not_found", param="instance_id"
            )
        return view_instance(state, instance).model_dump(mode="json")

    @app.post(
        "/instances",
        status_code=201,
        response_model=None,
        openapi_extra=_schema(PlaceInstanceRequest),
        tags=["cluster"],
    )
    async def place_instance(request: Request) -> Response:  # pyright: ignore[reportUnusedFunction]
        body = await _parse_body(request, PlaceInstanceRequest, settings.max_request_bytes)
        model_id = (await _card_or_hub(backend, settings, body.model)).model_id
        stages = (
            None
            if body.stages is None
            else tuple(
                PinnedStage(
                    node_id=NodeId(s.node_id),
                    device=s.device,
                    engine=s.engine,
                    start_layer=s.start_layer,
                    end_layer=s.end_layer,
                )
                for s in body.stages
            )
        )
        command = PlaceInstance(
            model_id=model_id,
            node_id=None if body.node_id is None else NodeId(body.node_id),
            engine=body.engine,
            stages=stages,
            objective=body.objective,
            context_length=body.context_length,
            include_nodes=None
            if body.include_nodes is None
            else tuple(NodeId(n) for n in body.include_nodes),
            exclude_nodes=tuple(NodeId(n) for n in body.exclude_nodes),
            include_devices=None if body.include_devices is None else tuple(body.include_devices),
            exclude_devices=tuple(body.exclude_devices),
        )
        accepted = await send_command(backend, command, settings)
        if accepted.created_id is None:
            raise ApiError(500, "The master placed no instance.", code="placement_failed")
        await wait_applied(backend, accepted.last_index, settings)
        reply = InstancePlaced(
            instance_id=InstanceId(accepted.created_id),
            model=model_id,
            last_index=accepted.last_index,
        )
        return JSONResponse(reply.model_dump(mode="json"), status_code=201)

    @app.delete("/instances/{instance_id}", tags=["cluster"])
    async def delete_instance(instance_id: str) -> dict[str, Any]:  # pyright: ignore[reportUnusedFunction]
        accepted = await send_command(
            backend, DeleteInstance(instance_id=InstanceId(instance_id)), settings
        )
        await wait_applied(backend, accepted.last_index, settings)
        reply = InstanceDeletedReply(
            instance_id=InstanceId(instance_id), last_index=accepted.last_index
        )
        return reply.model_dump(mode="json")

    # --- a hub model's files, for peers (the hub's own paths, under /hub) ---------------

    @app.get("/hub/api/models/{owner}/{name}/tree/{commit}", tags=["cluster"], response_model=None)
    async def hub_listing(owner: str, name: str, commit: str) -> Response:  # pyright: ignore[reportUnusedFunction]
        repo = f"{owner}/{name}"
        listing = await anyio.to_thread.run_sync(backend.model_listing, repo, commit)
        if listing is None:
            raise _not_held(repo, commit)
        return Response(listing, media_type="application/json")

    @app.get(
        "/hub/{owner}/{name}/resolve/{commit}/{path:path}", tags=["cluster"], response_model=None
    )
    async def hub_file(  # pyright: ignore[reportUnusedFunction]
        owner: str, name: str, commit: str, path: str, request: Request
    ) -> Response:
        repo = f"{owner}/{name}"
        found = await anyio.to_thread.run_sync(backend.model_file, repo, commit, path)
        if found is not None:
            return HeldFile(found)  # answers Range requests: a peer resumes a part file
        growing = await anyio.to_thread.run_sync(backend.model_part, repo, commit, path)
        answer = None
        if growing is not None:
            answer = await growing_response(growing, request.headers.get("range"))
        if answer is None:
            raise _not_held(repo, commit, path)
        return answer

    _with_body_schemas(app, [ChatCompletionRequest, PlaceInstanceRequest, AddModelRequest])
    mount_dashboard(app, dashboard_dir)
    return app


def _not_held(repo: str, commit: str, path: str | None = None) -> ApiError:
    what = f"{repo}@{commit}" + (f" {path}" if path else "")
    return ApiError(404, f"This node neither holds nor is downloading {what}.", code="not_held")


async def _card_or_hub(
    backend: ApiBackend, settings: ApiSettings, model: str, add: bool = True
) -> ModelCard:
    """The model's card; a hub repository id (`owner/name`) the cluster does not know yet is
    read from the hub and added, as `POST /models` would (any OpenAI client can name one)."""
    card = backend.model_card(ModelId(model))
    if card is not None:
        return card
    if not is_repo_id(model):
        raise model_not_found(model)
    card = await _describe(backend, model, "main", "model")
    if add:
        await _add(backend, settings, card)
    return card


async def _add(backend: ApiBackend, settings: ApiSettings, card: ModelCard) -> None:
    accepted = await send_command(backend, AddModel(card=card), settings)
    await wait_applied(backend, accepted.last_index, settings)


async def _describe(backend: ApiBackend, repo: str, revision: str, param: str) -> ModelCard:
    """The hub repository's card, or the ApiError that says why there is none."""
    try:
        check_repo_id(repo)
    except ValueError as e:
        raise ApiError(400, f"{e}.", code="invalid_value", param=param) from None
    try:
        return await backend.describe_hub_model(repo, revision)
    except HubNotFound as e:
        raise ApiError(
            404,
            f"The model '{repo}' is neither one this cluster serves nor on the hub ({e}).",
            code="model_not_found",
            param=param,
        ) from None
    except HubDenied as e:
        raise ApiError(403, f"{e}.", code="hub_denied", param=param) from None
    except UnsupportedModel as e:
        raise ApiError(400, f"{e}.", code="unsupported_model", param=param) from None
    except HubError as e:
        raise ApiError(502, f"{e}.", code="hub_unavailable") from None


async def _ignore(_note: str) -> None:
    return None


def _events_start(state: State, from_index: int | None, last_event_id: str | None) -> int:
    """Last-Event-ID (an EventSource resuming) wins over ?from=; neither means live only."""
    if last_event_id is not None and last_event_id.strip():
        try:
            last = int(last_event_id.strip())
        except ValueError:
            raise ApiError(
                400,
                "Last-Event-ID must be an event index.",
                code="invalid_value",
                param="Last-Event-ID",
            ) from None
        if last < -1:
            raise ApiError(
                400, "Last-Event-ID must be >= -1.", code="invalid_value", param="Last-Event-ID"
            )
        return last + 1
    if from_index is not None:
        return from_index
    return state.last_index + 1


async def _generate(
    backend: ApiBackend,
    placements: Placements,
    settings: ApiSettings,
    task_id: TaskId,
    model_id: ModelId,
    params: ChatParams,
) -> tuple[str, StreamEnd]:
    """The whole generated text of a request that is not streamed, and how it ended."""
    parts: list[str] = []

    async def collect(text: str) -> None:
        parts.append(text)

    end = await serve_task(
        backend, placements, task_id, model_id, params, settings, _ignore, collect
    )
    return "".join(parts), end


async def _stream(
    backend: ApiBackend,
    placements: Placements,
    settings: ApiSettings,
    task_id: TaskId,
    model_id: ModelId,
    params: ChatParams,
    chunks: StreamChunks,
    channel: SSEChannel,
) -> None:
    async def on_wait(note: str) -> None:
        await channel.comment(note)

    opened = False

    async def on_token(text: str) -> None:
        nonlocal opened
        data = chunks.piece(text) if opened else chunks.opening(text)
        opened = True
        if data:
            await channel.write(data)

    end = await serve_task(
        backend, placements, task_id, model_id, params, settings, on_wait, on_token
    )
    if not opened:
        await on_token("")
    await channel.write(chunks.closing(end))


def _methods_of_path(app: FastAPI, request: Request) -> list[str]:
    """The methods the API's routes take on this request's path (none: not an API path)."""
    methods: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and route.matches(request.scope)[0] is Match.PARTIAL:
            methods |= route.methods or set()
    return sorted(methods)
