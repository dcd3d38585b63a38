"""Every error the API returns, in OpenAI's shape: `{"error": {message, type, param, code}}`."""

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import cast

from pydantic import ValidationError
from starlette.responses import JSONResponse

from exo.shared.types.base import Frozen
from exo.shared.types.commands import CommandRejected, RejectionCode


class ErrorDetail(Frozen):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(Frozen):
    error: ErrorDetail


class ApiError(Exception):
    """An HTTP error with an OpenAI error body; raise it anywhere below an endpoint."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        # OpenAI's convention: client mistakes are invalid_request_error, the rest server_error.
        self.error_type = error_type or (
            "invalid_request_error" if status < 500 else "server_error"
        )

    def body(self) -> ErrorBody:
        return ErrorBody(
            error=ErrorDetail(
                message=self.message, type=self.error_type, param=self.param, code=self.code
            )
        )

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(mode="json"), status_code=self.status)


def model_not_found(model: str) -> ApiError:
    return ApiError(
        404,
        f"The model '{model}' does not exist; GET /v1/models lists the models this cluster serves.",
        code="model_not_found",
        param="model",
    )


def above_context(param: str, value: int, model: str, context_length: int) -> ApiError:
    """A token count a request asks for beyond the model's context."""
    return ApiError(
        400,
        f"{param} is too large: {value}. Model '{model}' has a context of {context_length} tokens.",
        code="invalid_value",
        param=param,
    )


# (HTTP status, error code) for each typed rejection the master can answer with.
_REJECTION_STATUS: dict[RejectionCode, tuple[int, str]] = {
    "unknown_model": (404, "model_not_found"),
    "no_instance": (503, "no_instance"),
    "not_found": (404, "not_found"),
    "placement_failed": (503, "placement_failed"),
    # An election is in progress or this node followed a stale master: worth a retry.
    "not_master": (503, "not_master"),
    "invalid": (400, "invalid_request"),
    "invalid_split": (400, "invalid_split"),
    "unavailable": (503, "unavailable"),
}


def error_from_rejection(rejection: CommandRejected) -> ApiError:
    status, code = _REJECTION_STATUS[rejection.code]
    return ApiError(status, rejection.message, code=code)


class _Issue(Frozen):
    """One validation error, typed: FastAPI hands them over as `Sequence[Any]`."""

    type: str
    loc: tuple[str | int, ...]
    msg: str
    reason: str | None = None


def _issue(raw: object) -> _Issue:
    if not isinstance(raw, Mapping):
        return _Issue(type="invalid_value", loc=(), msg=str(raw))
    item = cast("Mapping[str, object]", raw)
    loc = item.get("loc", ())
    parts = cast("Sequence[object]", loc) if isinstance(loc, tuple | list) else ()
    ctx = item.get("ctx")
    reason = cast("Mapping[str, object]", ctx).get("error") if isinstance(ctx, Mapping) else None
    return _Issue(
        type=str(item.get("type", "invalid_value")),
        loc=tuple(p if isinstance(p, int) else str(p) for p in parts),
        msg=str(item.get("msg", "invalid")),
        reason=None if reason is None else str(reason),
    )


def error_from_validation(errors: Sequence[object]) -> ApiError:
    """Pydantic/FastAPI validation errors: 400 when the body is not JSON at all, else 422."""
    issues = [_issue(e) for e in errors]
    bad_json = next((i for i in issues if i.type == "json_invalid"), None)
    if bad_json is not None:
        detail = f": {bad_json.reason}" if bad_json.reason else "."
        return ApiError(400, f"The request body is not valid JSON{detail}", code="invalid_json")
    if not issues:
        return ApiError(422, "The request is invalid.", code="invalid_value")
    issues = _merge_union_branches(issues)
    parts = [f"{_param(i.loc) or 'body'}: {i.msg}" for i in issues[:5]]
    more = f" (and {len(issues) - 5} more)" if len(issues) > 5 else ""
    first = issues[0]
    return ApiError(422, "; ".join(parts) + more, code=first.type, param=_param(first.loc))


def error_from_validation_error(error: ValidationError) -> ApiError:
    return error_from_validation(error.errors(include_url=False))


# Field names in the API are snake_case; pydantic names the branches of a union in `loc`
# with what is not: "str", "constrained-str", "list[ContentPart]", "TextPart".
_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_BRANCH_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "bytes"})


def _is_branch(part: str | int) -> bool:
    return isinstance(part, str) and (part in _BRANCH_NAMES or _FIELD_NAME.fullmatch(part) is None)


def _union_point(issue: _Issue) -> tuple[str | int, ...] | None:
    """The path of the union whose branch this issue is from (None: not from a union)."""
    branch = next((n for n, p in enumerate(issue.loc) if _is_branch(p)), None)
    return None if branch is None else issue.loc[:branch]


def _merge_union_branches(issues: list[_Issue]) -> list[_Issue]:
    """One issue per field of a union that failed every branch: the field's own path (no
    branch names), and what the branch the value was meant for says ("List should have at
    most 4 items" for a list of 5 stop strings, not "Input should be a valid string"); when
    the value fits no branch's type, the types it could have been."""
    merged: list[_Issue] = []
    # pydantic reports a union's branches one after the other.
    for at, run in itertools.groupby(issues, key=_union_point):
        if at is None:
            merged.extend(run)
            continue
        group = [
            i.model_copy(update={"loc": tuple(p for p in i.loc if not _is_branch(p))}) for i in run
        ]
        # A branch whose type the value had failed deeper, or on a constraint: that one.
        meant = [i for i in group if i.loc != at or not i.type.endswith("_type")]
        if meant:
            merged.extend(meant)
            continue
        kinds = [i.msg.removeprefix("Input should be ") for i in group]
        message = "Input should be " + " or ".join(dict.fromkeys(kinds))
        merged.append(group[0].model_copy(update={"msg": message}))
    return merged


def _param(loc: tuple[str | int, ...]) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif out == "" and part in ("body", "query", "path", "header"):
            continue
        else:
            out += f".{part}" if out else part
    return out or None
