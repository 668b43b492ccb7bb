"""Who is calling: ``Authorization: Bearer <key>`` mapped to a tenant by ``settings.api_keys``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.errors import Unauthorized
from simmim_service.settings import Settings

bearer = HTTPBearer(auto_error=False, description="An API key from SIMMIM_API_KEYS")


def tenant_for_key(key: str, api_keys: dict[str, str]) -> str | None:
    """The tenant of ``key``; compares against every key in constant time per key."""
    given = key.encode()
    found = None
    for candidate, tenant in api_keys.items():
        if hmac.compare_digest(given, candidate.encode()):
            found = tenant
    return found


def resolve_tenant(*, settings: Settings, authorization: str | None, key: str | None) -> str:
    """The caller's tenant, or ``Unauthorized``.

    Without any ``Authorization`` header and with ``auth_required`` off, the caller is
    ``default_tenant``. A key that is given is always checked, required or not.
    """
    if authorization is None:
        if not settings.auth_required:
            return settings.default_tenant
        raise Unauthorized("this API needs a key: send 'Authorization: Bearer <key>'")
    if key is None:
        raise Unauthorized("malformed Authorization header; expected 'Bearer <key>'")
    tenant = tenant_for_key(key, settings.api_keys)
    if tenant is None:
        raise Unauthorized("invalid API key")
    return tenant


async def current_tenant(request: Request,
                   credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]) -> str:
    """FastAPI dependency: the tenant of this request."""
    return resolve_tenant(settings=request.app.state.settings,
                          authorization=request.headers.get("authorization"),
                          key=credentials.credentials if credentials else None)
