"""Streamed artifact downloads with ETag, ``If-None-Match`` (304), ``Range`` (206/416) and ``If-Range``.

Files are read from the artifact store (a local directory or a bucket) in 1 MiB chunks in a
worker thread, never whole.
Only single byte ranges are served; a multi-range or unparsable ``Range`` is ignored (the
whole file, 200), as RFC 9110 allows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import Response, StreamingResponse

from api.errors import Gone, RangeNotSatisfiable
from simmim_service.artifacts import ArtifactStore

CHUNK = 1 << 20


@dataclass(frozen=True)
class Download:
    """What to send: an artifact key, its name for the client, and its sha256 when known."""

    key: str
    filename: str
    media_type: str = "application/octet-stream"
    sha256: str | None = None


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The inclusive byte range of a ``Range`` header, None to ignore it, or ``RangeNotSatisfiable``."""
    unit, _, spec = header.partition("=")
    first, dash, last = spec.strip().partition("-")
    if unit.strip().lower() != "bytes" or "," in spec or not dash:
        return None
    if not (first.isdigit() or first == "") or not (last.isdigit() or last == "") or first == last == "":
        return None
    if first == "":
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes of a {size}-byte file", size=size)
        return max(0, size - length), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        raise RangeNotSatisfiable(f"range {header!r} is outside the file ({size} bytes; valid offsets "
                                  f"0-{max(size - 1, 0)})", size=size)
    return start, min(end, size - 1)


def _etag_matches(header: str, etag: str) -> bool:
    """Weak comparison, as ``If-None-Match`` uses."""
    if header.strip() == "*":
        return True
    return any(tag.strip().removeprefix("W/") == etag for tag in header.split(","))


def _read(store: ArtifactStore, key: str, start: int, length: int) -> Iterator[bytes]:
    with store.open(key) as fh:
        fh.seek(start)
        left = length
        while left > 0:
            chunk = fh.read(min(CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk


def serve(store: ArtifactStore, item: Download, request_headers: Headers) -> Response:
    """The download response for ``item``, honouring the conditional and range headers."""
    try:  # one request to a remote store, and no window between "exists" and "how big"
        size = store.size(item.key)
    except FileNotFoundError:
        raise Gone(f"{item.filename} is no longer in the artifact store (older checkpoints are pruned "
                   "by keep_last)") from None
    headers: dict[str, Any] = {"Accept-Ranges": "bytes",
                               "Content-Disposition": f'attachment; filename="{item.filename}"'}
    etag = f'"{item.sha256}"' if item.sha256 else None
    if etag and item.sha256:
        headers |= {"ETag": etag, "X-Checksum-SHA256": item.sha256}
        if_none_match = request_headers.get("if-none-match")
        if if_none_match is not None and _etag_matches(if_none_match, etag):
            return Response(status_code=304, headers={"ETag": etag})
    byte_range = None
    range_header = request_headers.get("range")
    if_range = request_headers.get("if-range")
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        byte_range = parse_range(range_header, size)
    start, end = byte_range or (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(_read(store, item.key, start, end - start + 1), status_code=status,
                             headers=headers, media_type=item.media_type)
