"""The app as a whole: no torch in the API process, the factory reads settings only when
called, and the OpenAPI document describes every route and its problem responses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from api.main import create_app
from api.routes import checkpoints, embeddings, events, health, jobs, neighbours
from api.routes import previews as preview_routes
from tests.api.conftest import make_settings
from tests.api.fakes import FakeDispatcher

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SIMMIM_")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_api_never_imports_torch_and_reads_settings_in_the_factory(tmp_path: Path) -> None:
    code = ("import sys, api.main\n"
            "assert 'torch' not in sys.modules and 'timm' not in sys.modules, 'torch imported at import'\n"
            "app = api.main.app_factory()\n"
            "assert app.state.settings.database_url.endswith('factory.db'), app.state.settings.database_url\n"
            "assert 'torch' not in sys.modules, 'torch imported by create_app'\n"
            "print('ok')")
    proc = _python(code, SIMMIM_DATABASE_URL=f"sqlite:///{tmp_path / 'factory.db'}")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


ROUTES = {
    ("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"), ("POST", "/v1/jobs/{job_id}/cancel"),
    ("GET", "/v1/jobs/{job_id}/metrics"), ("GET", "/v1/jobs/{job_id}/events"),
    ("GET", "/v1/jobs/{job_id}/checkpoints"), ("GET", "/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/content"),
    ("POST", "/v1/jobs/{job_id}/embeddings"), ("POST", "/v1/jobs/{job_id}/embedding-runs"),
    ("GET", "/v1/jobs/{job_id}/embedding-runs/{run_id}"), ("GET", "/v1/jobs/{job_id}/embedding-runs/{run_id}/embeddings"),
    ("GET", "/v1/jobs/{job_id}/embedding-runs/{run_id}/files"),
    ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("GET", "/v1/jobs/{job_id}/previews"), ("GET", "/v1/jobs/{job_id}/previews/{name}"),
    ("GET", "/v1/jobs/{job_id}/plot.png"),
    ("POST", "/v1/jobs/{job_id}/neighbours"), ("GET", "/v1/jobs/{job_id}/dataset-images/{index}"),
}


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[APIRoute]]:
    tmp = tmp_path_factory.mktemp("openapi")
    app = create_app(make_settings(tmp, "sqlite://"), FakeDispatcher())
    modules = (jobs, events, checkpoints, embeddings, health, preview_routes, neighbours)
    api_routes = [r for m in modules for r in m.router.routes if isinstance(r, APIRoute)]
    assert {(m, r.path) for r in api_routes for m in r.methods or ()} == ROUTES
    return app.openapi(), api_routes


def test_openapi_lists_every_route_with_responses_and_problems(openapi: tuple[dict[str, Any], list[APIRoute]]) -> None:
    doc, routes = openapi
    assert doc["info"]["title"] == "SimMIM pretraining service"
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    assert {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops} == ROUTES
    for route in routes:
        for method in route.methods or ():
            op = doc["paths"][route.path][method.lower()]
            assert op["tags"] and op["summary"] and op.get("description"), (route.path, method)
            success = [c for c in op["responses"] if c.startswith("2")]
            assert success and any(op["responses"][c].get("content") for c in success), (route.path, method)
            problems = [r for c, r in op["responses"].items() if c[0] in "45"]
            assert "500" in op["responses"], f"{method} {route.path} documents no 500 problem"
            if route.path.startswith("/v1/"):
                assert {"401", "422"} <= set(op["responses"]), (route.path, method)
            for response in problems:
                assert response["content"] == {"application/problem+json": {
                    "schema": {"$ref": "#/components/schemas/Problem"}}}, (route.path, method)


def test_openapi_bodies_security_and_examples(openapi: tuple[dict[str, Any], list[APIRoute]]) -> None:
    doc, _ = openapi
    schemas = doc["components"]["schemas"]
    create = doc["paths"]["/v1/jobs"]["post"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobCreate"}
    assert set(create["responses"]) >= {"200", "201", "401", "413", "422", "503"}
    assert schemas["JobCreate"]["examples"][0]["training"]["model"] == "vit_tiny_patch16_224"
    embed = doc["paths"]["/v1/jobs/{job_id}/embeddings"]["post"]["requestBody"]["content"]
    assert set(embed) == {"application/json", "multipart/form-data"}
    assert schemas["EmbeddingUpload"]["properties"]["files"]["items"]["format"] == "binary"
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    event = doc["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]
    assert event["schema"]["required"] == ["data"] and set(event["schema"]["properties"]) == {
        "id", "event", "data", "retry"}  # OpenAPI 3.1: the schema of an event stream describes one event
    refs = {"#/components/schemas/" + name for name in schemas}
    assert all(ref in refs for ref in _refs(doc)), "dangling $ref"


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
