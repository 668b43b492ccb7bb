"""The API's one error hierarchy and the one place that turns errors into HTTP responses.

Every error leaves as RFC 9457 ``application/problem+json``: ``type``, ``title``, ``status``,
``detail``, ``instance``, plus ``errors: [{field, message}]`` on 422 and any extension
members a ``ProblemError`` carries (``job_id`` on a 503 from ``POST /v1/jobs``, ...).

``ProblemError`` subclasses Starlette's ``HTTPException`` on purpose: FastAPI re-raises
HTTP exceptions raised while it reads a request body, so a ``PayloadTooLarge`` raised by the
body-size middleware's ``receive`` reaches the handler below instead of becoming a 400.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobstore.repo import (
    IdempotencyConflictError,
    InvalidTransitionError,
    JobNotFoundError,
    StoreError,
)

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("api.errors")


class FieldProblem(BaseModel):
    """One invalid input: where it is (``training.mask_ratio``, ``files[2]``) and what is wrong."""

    field: str
    message: str


class Problem(BaseModel):
    """An RFC 9457 problem document."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "urn:simmim:problem:not-found", "title": "Not Found", "status": 404,
        "detail": "job 'job_01jq3v5n6x0000000000' not found", "instance": "/v1/jobs/job_01jq3v5n6x0000000000"}]})

    type: str = Field(default="about:blank", description="URI reference that identifies the problem type")
    title: str = Field(description="Short summary of the problem type")
    status: int = Field(description="HTTP status code")
    detail: str | None = Field(default=None, description="What went wrong in this occurrence, and what to do")
    instance: str | None = Field(default=None, description="The request path")
    errors: list[FieldProblem] | None = Field(default=None, description="Every invalid input (422 only)")


class ProblemError(StarletteHTTPException):
    """Base of every error the API raises on purpose; subclasses fix the status and type."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"

    def __init__(self, detail: str, *, errors: list[dict[str, str]] | None = None,
                 headers: Mapping[str, str] | None = None, **extensions: Any) -> None:
        super().__init__(status_code=self.status, detail=detail, headers=dict(headers) if headers else None)
        self.errors = errors
        self.extensions = extensions


class BadRequest(ProblemError):
    status, slug = 400, "bad-request"


class Unauthorized(ProblemError):
    status, slug = 401, "unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"WWW-Authenticate": 'Bearer realm="simmim"'})


class NotFound(ProblemError):
    status, slug = 404, "not-found"


class Conflict(ProblemError):
    status, slug = 409, "conflict"


class Gone(ProblemError):
    status, slug = 410, "gone"


class PayloadTooLarge(ProblemError):
    status, slug = 413, "payload-too-large"


class UnsupportedMediaType(ProblemError):
    status, slug = 415, "unsupported-media-type"


class RangeNotSatisfiable(ProblemError):
    status, slug = 416, "range-not-satisfiable"

    def __init__(self, detail: str, *, size: int) -> None:
        super().__init__(detail, headers={"Content-Range": f"bytes */{size}"})


class Unprocessable(ProblemError):
    status, slug = 422, "validation-error"


class TooManyRequests(ProblemError):
    """429: a rate limit or a quota; always with ``Retry-After`` (whole seconds)."""

    status, slug = 429, "too-many-requests"

    def __init__(self, detail: str, *, retry_after: int, **extensions: Any) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))}, **extensions)


class BadGateway(ProblemError):
    status, slug = 502, "bad-gateway"


class ServiceUnavailable(ProblemError):
    status, slug = 503, "service-unavailable"


class GatewayTimeout(ProblemError):
    status, slug = 504, "gateway-timeout"


def _idempotency_conflict(err: StoreError) -> ProblemError:
    return Unprocessable(str(err), errors=[{"field": "header.Idempotency-Key", "message": str(err)}])


STORE_ERRORS: dict[type[StoreError], Callable[[StoreError], ProblemError]] = {
    JobNotFoundError: lambda err: NotFound(str(err)),
    InvalidTransitionError: lambda err: Conflict(str(err)),
    IdempotencyConflictError: _idempotency_conflict,
}


def problem_response(request_path: str, *, status: int, detail: str | None, type_: str = "about:blank",
                     headers: Mapping[str, str] | None = None, errors: list[dict[str, str]] | None = None,
                     **extensions: Any) -> JSONResponse:
    """A problem+json response; the only constructor of error bodies in the API."""
    body: dict[str, Any] = {"type": type_, "title": HTTPStatus(status).phrase, "status": status,
                            "detail": detail, "instance": request_path}
    if errors is not None:
        body["errors"] = errors
    body.update(extensions)
    return JSONResponse(body, status_code=status, headers=dict(headers) if headers else None, media_type=PROBLEM_JSON)


def _from_problem(request: Request, exc: ProblemError) -> JSONResponse:
    return problem_response(request.url.path, status=exc.status_code, detail=exc.detail,
                            type_=f"urn:simmim:problem:{exc.slug}", headers=exc.headers,
                            errors=exc.errors, **exc.extensions)


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "training", "mask_ratio")`` -> ``training.mask_ratio``; ``("query", "limit")`` stays prefixed."""
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:] or ["body"]
    return ".".join(parts) if parts else "request"


def field_problems(errors: list[Any]) -> list[dict[str, str]]:
    """Pydantic/FastAPI error dicts as ``[{field, message}]`` (the received value on type errors)."""
    problems = []
    for err in errors:
        message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "json_invalid":
            problems.append({"field": "body", "message": f"malformed JSON: {(err.get('ctx') or {}).get('error', message)}"})
            continue
        got = err.get("input")
        if err.get("type") not in ("missing", "extra_forbidden") and isinstance(got, str | int | float | bool):
            message = f"{message} (got {got!r})"
        problems.append({"field": _field(err.get("loc", ())), "message": message})
    return problems


def validation_detail(problems: list[dict[str, str]]) -> str:
    """One sentence naming the first few problems."""
    shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:3])
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    noun = "problem" if len(problems) == 1 else "problems"
    return f"the request has {len(problems)} {noun}: {shown}{more}"


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return _from_problem(request, exc)


async def _on_store_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StoreError)
    mapped = next((to_problem for kind, to_problem in STORE_ERRORS.items() if isinstance(exc, kind)), None)
    if mapped is None:
        return await _on_unexpected(request, exc)
    return _from_problem(request, mapped(exc))


async def _on_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = field_problems(list(exc.errors()))
    return _from_problem(request, Unprocessable(validation_detail(problems), errors=problems))


async def _on_http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    if exc.status_code == 404 and detail == "Not Found":
        detail = f"no route {request.method} {request.url.path}; see /docs for the API"
    elif exc.status_code == 400 and detail == "There was an error parsing the body":  # FastAPI's words
        detail = ("the request body cannot be parsed; send JSON encoded as UTF-8 with "
                  "'Content-Type: application/json'")
    elif exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "")
        detail = f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}"
    return problem_response(request.url.path, status=exc.status_code, detail=detail, headers=exc.headers)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(request.url.path, status=500,
                            detail="an internal error occurred; it has been logged")


class UnexpectedErrorMiddleware:
    """Answers an unexpected exception with the generic 500 problem, logged once by ``_on_unexpected``.

    Without it Starlette's outermost middleware answers the 500 and then re-raises, so the
    server logs the traceback a second time and drops the keep-alive connection under the
    client's next request. A response that has already started cannot be replaced: that
    error still goes up.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:
                raise
            response = await _on_unexpected(Request(scope), exc)
            await response(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Map every error to problem+json: ours, the job store's, FastAPI's and Starlette's, and the rest."""
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StoreError, _on_store_error)
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(StarletteHTTPException, _on_http)
    app.add_exception_handler(Exception, _on_unexpected)


ResponsesDoc = dict[int | str, dict[str, Any]]


def problem_responses(*statuses: int) -> ResponsesDoc:
    """OpenAPI ``responses=`` entries documenting problem+json bodies for ``statuses``."""
    return {status: {"model": Problem, "description": HTTPStatus(status).phrase,
                     "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for status in statuses}
