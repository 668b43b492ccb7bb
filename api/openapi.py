"""The OpenAPI document: FastAPI's, plus the schemas of the hand-parsed embedding body, with
error responses documented only as ``application/problem+json``."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from api.errors import PROBLEM_JSON
from api.schemas.embeddings import EmbeddingForm, EmbeddingRequest
from simmim_service.spec import JobCreate

TAGS = [
    {"name": "jobs", "description": "Create, list, inspect and cancel pretraining jobs"},
    {"name": "events", "description": "Live job events as Server-Sent Events"},
    {"name": "checkpoints", "description": "Checkpoints and exported encoders, resumable downloads"},
    {"name": "embeddings", "description": "Embeddings from a trained encoder"},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics"},
]


def _schema(model: type[BaseModel], schemas: dict[str, Any]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models moved into ``schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, nested in schema.pop("$defs", {}).items():
        schemas.setdefault(name, nested)
    return schema


def _add_model_schemas(schemas: dict[str, Any]) -> None:
    """Bodies that routes parse by hand (to report every problem at once) still get schemas."""
    schemas["JobCreate"] = _schema(JobCreate, schemas)
    schemas["EmbeddingRequest"] = _schema(EmbeddingRequest, schemas)
    form = _schema(EmbeddingForm, schemas)
    form["title"] = "EmbeddingUpload"
    form["properties"] = {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                    "description": "Image files (repeat the part)"}, **form["properties"]}
    form["required"] = ["files"]
    schemas["EmbeddingUpload"] = form


TOO_MANY_REQUESTS = {
    "description": "Too Many Requests: the tenant's rate limit (SIMMIM_RATE_LIMIT_PER_MINUTE) or, on "
                   "POST /v1/jobs, its active-job quota (SIMMIM_MAX_ACTIVE_JOBS_PER_TENANT)",
    "headers": {"Retry-After": {"description": "Seconds to wait before retrying", "required": True,
                                "schema": {"type": "integer", "minimum": 1}}},
    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


BAD_BODY = {
    "description": "Bad Request: the body cannot be parsed at all (not UTF-8 JSON, broken multipart)",
    "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
}


def _tidy_operations(paths: dict[str, Any]) -> None:
    """Error responses only as problem+json; a request body given as ``$ref`` keeps nothing else;
    every ``/v1`` operation documents the 429 of the rate limiter, every body the 400 of an unparsable one."""
    for path, operations in paths.items():
        for operation in operations.values():
            if path.startswith("/v1/"):
                operation.setdefault("responses", {})["429"] = TOO_MANY_REQUESTS
            if "requestBody" in operation:
                operation.setdefault("responses", {}).setdefault("400", BAD_BODY)
            for media in operation.get("requestBody", {}).get("content", {}).values():
                if "$ref" in media.get("schema", {}):
                    media["schema"] = {"$ref": media["schema"]["$ref"]}
            for code, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if code[:1] in ("4", "5") and PROBLEM_JSON in content:
                    response["content"] = {PROBLEM_JSON: content[PROBLEM_JSON]}


def install_openapi(app: FastAPI) -> None:
    """Replace ``app.openapi`` with the completed document (built once, then cached)."""

    def build() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes, tags=TAGS)
            _add_model_schemas(schema.setdefault("components", {}).setdefault("schemas", {}))
            _tidy_operations(schema["paths"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = build  # type: ignore[method-assign]
