"""The dashboard: a static page at ``/`` (``api/static/``) that drives the API from the browser.

Plain HTML, CSS and JavaScript shipped with the package: no build step, no CDN. The page
holds no data of its own; it calls ``/v1`` with the API key the user gives it (kept in the
browser's localStorage, sent as ``Authorization: Bearer``, never put in a URL). Not part of
the OpenAPI document.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from api.errors import NotFound

router = APIRouter(include_in_schema=False)
STATIC = Path(__file__).resolve().parents[1] / "static"
FILES = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


@router.get("/dashboard")
def dashboard() -> RedirectResponse:
    return RedirectResponse("/", status_code=307)


@router.get("/static/{name}")
def static(name: str) -> FileResponse:
    """Only the page's own files; nothing else on disk is reachable."""
    if name not in FILES:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(STATIC / name, media_type=FILES[name], headers=SECURITY_HEADERS)
