"""Per-tenant request rate limits: a token bucket per API key's tenant, answered with 429.

Each tenant has a bucket of ``rate_limit_burst`` tokens that refills at
``rate_limit_per_minute / 60`` tokens per second; a request takes one token, and a request
that finds none is answered ``429 Too Many Requests`` (problem+json) with ``Retry-After``: the
whole seconds until a token is back. ``rate_limit_per_minute = 0`` turns limiting off.

Who is counted:

* a valid key: its tenant (every key of a tenant shares one bucket);
* no ``Authorization`` header where keys are not required (embedded mode): ``default_tenant``;
* anything else (no key where one is required, an unknown or malformed key): the client's
  address, so guessing keys is limited too, and the 401 comes as long as the budget lasts.

``/healthz``, ``/readyz`` and ``/metrics`` are never limited (probes and scrapers must get
through a flood).

The buckets live in this API process. With several API replicas each enforces its own
budget, so a tenant may get up to ``replicas x`` the rate: set the per-replica value to the
global budget divided by the replica count. A shared counter in Redis was not used: the
embedded mode has no Redis (its broker is SQLite), and it would put a network round trip,
and a new way to fail, in front of every request. Limiting is checked before the body is read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from api.auth import tenant_for_key
from api.errors import TooManyRequests, problem_response
from simmim_service.settings import Settings

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_BUCKETS = 10_000
"""Above this many buckets, full ones (which a new bucket would equal) are dropped."""


@dataclass
class Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """One token bucket per name; ``take`` answers 0 (allowed) or the seconds to wait."""

    def __init__(self, per_minute: int, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self.buckets: dict[str, Bucket] = {}

    def take(self, name: str) -> float:
        """Take one token from ``name``'s bucket; 0.0 when there was one, else seconds until there is."""
        now = self.clock()
        bucket = self.buckets.get(name)
        if bucket is None:
            if len(self.buckets) >= MAX_BUCKETS:
                self._prune(now)
            bucket = self.buckets[name] = Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate

    def _prune(self, now: float) -> None:
        full = [name for name, b in self.buckets.items()
                if b.tokens + (now - b.updated) * self.rate >= self.burst]
        for name in full:
            del self.buckets[name]


def bucket_name(scope: Scope, settings: Settings) -> str:
    """Whose budget a request spends (see the module docstring); never the key itself."""
    authorization = Headers(scope=scope).get("authorization")
    if authorization is None and not settings.auth_required:
        return f"tenant:{settings.default_tenant}"
    if authorization is not None:
        scheme, _, key = authorization.partition(" ")
        tenant = tenant_for_key(key.strip(), settings.api_keys) if scheme.lower() == "bearer" and key else None
        if tenant is not None:
            return f"tenant:{tenant}"
    client = scope.get("client")
    return f"client:{client[0] if client else 'unknown'}"


class RateLimitMiddleware:
    """Pure ASGI middleware: 429 + ``Retry-After`` once a tenant's bucket is empty."""

    def __init__(self, app: ASGIApp, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        self.settings = settings
        self.buckets = TokenBuckets(settings.rate_limit_per_minute, settings.rate_limit_burst, clock)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.settings.rate_limit_per_minute == 0
                or scope["path"] in EXEMPT_PATHS):
            await self.app(scope, receive, send)
            return
        name = bucket_name(scope, self.settings)
        wait = self.buckets.take(name)
        if wait <= 0:
            await self.app(scope, receive, send)
            return
        retry_after = max(1, math.ceil(wait))
        who = name.partition(":")[2]
        whose = f"tenant {who!r}" if name.startswith("tenant:") else f"unauthenticated client {who}"
        s = self.settings
        detail = (f"rate limit exceeded for {whose}: {s.rate_limit_per_minute} requests per minute with bursts "
                  f"of {s.rate_limit_burst} (SIMMIM_RATE_LIMIT_PER_MINUTE, SIMMIM_RATE_LIMIT_BURST); "
                  f"retry in {retry_after} s")
        response = problem_response(scope["path"], status=429, detail=detail,
                                    type_=f"urn:simmim:problem:{TooManyRequests.slug}",
                                    headers={"Retry-After": str(retry_after)})
        await response(scope, receive, send)
