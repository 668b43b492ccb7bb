"""Refuse request bodies over a byte limit with 413, before or while they are read.

A declared ``Content-Length`` over the limit is answered at once without reading the body;
a chunked body is counted as it arrives and ``receive`` raises ``PayloadTooLarge`` (handled
by ``api.errors`` like any other problem) as soon as it passes the limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import PayloadTooLarge, problem_response


class BodyLimitMiddleware:
    """Pure ASGI middleware: at most ``max_bytes`` of request body per request."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _detail(self, size: int | str) -> str:
        return f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = problem_response(scope["path"], status=413, detail=self._detail(declared),
                                        type_=f"urn:simmim:problem:{PayloadTooLarge.slug}",
                                        headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(self._detail(f"more than {self.max_bytes}"))
            return message

        await self.app(scope, counting_receive, send)
