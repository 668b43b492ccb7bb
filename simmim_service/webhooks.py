"""Webhooks: a signed POST of a job's terminal event to the URL the job named.

When a job with a ``webhook`` ends (``succeeded``, ``failed``, ``cancelled``),
``jobstore.repo`` writes a ``webhook_deliveries`` row in the same transaction as the status
change (an outbox: no event is lost or sent for a change that rolled back). The
``WebhookDeliverer`` thread in each API process sends due rows::

    POST <url>
    Content-Type: application/json
    X-SimMIM-Event-Id: whd_...            (the same on every retry of one event)
    X-SimMIM-Timestamp: 1767225600         (Unix seconds of this try)
    X-SimMIM-Signature: v1=<hex HMAC-SHA256(secret, f"{event_id}.{timestamp}.{raw_body}")>

    {"id": "whd_...", "type": "job.succeeded", "created_at": "...", "data": {"job_id": ..., ...}}

A 2xx answer delivers it; anything else (another status, a redirect, a timeout, a refused
connection) is retried after ``webhook_backoff_s``, doubled after each failure (at most an
hour), until ``webhook_max_attempts`` tries; then the row is ``failed`` and the job gets a
``log`` event saying so. Delivery is at least once: receivers de-duplicate on the event id.

Only ``http``/``https`` URLs are accepted (``JobCreate`` checks), redirects are not followed,
proxy variables are ignored, and the requests leave from the API process. With
``webhook_allow_private`` false (docker-compose's default) a URL whose host is or resolves to a
loopback, private, link-local or other non-public address is refused when the job is created,
and again when each try connects, to an address it has just checked (SSRF and DNS rebinding;
:mod:`simmim_service.addresses`). The secret is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy.orm import Session, sessionmaker

from jobstore import repo
from simmim_service.addresses import AddressRefused, checked_addresses
from simmim_service.periodic import Periodic
from simmim_service.settings import Settings

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 3600.0
SIGNATURE_VERSION = "v1"
USER_AGENT = "simmim-service-webhooks/1"


def sign(secret: str, event_id: str, timestamp: str, body: bytes) -> str:
    """``v1=<hex>``: HMAC-SHA256 with ``secret`` over ``{event_id}.{timestamp}.{body}``."""
    message = f"{event_id}.{timestamp}.".encode() + body
    return f"{SIGNATURE_VERSION}=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(secret: str, headers: dict[str, str], body: bytes, tolerance_s: float | None = 300.0) -> bool:
    """Whether a delivery's headers carry a valid signature of ``body`` (receiver side).

    ``headers`` keys are matched case-insensitively; ``tolerance_s`` bounds the timestamp's age
    (replays), None skips that check.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    event_id, stamp = lower.get("x-simmim-event-id", ""), lower.get("x-simmim-timestamp", "")
    given = lower.get("x-simmim-signature", "")
    if not event_id or not stamp.isdigit() or not given:
        return False
    if tolerance_s is not None and abs(time.time() - int(stamp)) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, event_id, stamp, body), given)


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed ones."""
    return float(min(MAX_BACKOFF_S, settings.webhook_backoff_s * 2 ** max(0, attempts - 1)))


@dataclass(frozen=True)
class Outcome:
    delivery_id: str
    error: str | None


def _host(url: str) -> str:
    return urlsplit(url).netloc.rsplit("@", 1)[-1]  # never log credentials in the URL


class GuardedBackend(httpcore.SyncBackend):
    """Connects only to addresses ``checked_addresses`` allows, resolving each name itself.

    TLS still verifies the certificate against the URL's host name: httpcore passes that
    name to the TLS handshake, not the address connected to.
    """

    def __init__(self, *, allow_private: bool) -> None:
        self.allow_private = allow_private

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Any = None) -> httpcore.NetworkStream:
        try:
            addresses = checked_addresses(host, port, allow_private=self.allow_private)
        except AddressRefused as err:
            raise httpcore.ConnectError(str(err)) from err
        failure: httpcore.ConnectError | None = None
        for address in addresses:
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as err:
                failure = err
        raise failure or httpcore.ConnectError(f"{host} has no address")


#: What one try can fail with, short of a programming error.
_REQUEST_ERRORS = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError,
                   httpcore.UnsupportedProtocol, OSError)


class WebhookDeliverer(Periodic):
    """Sends due webhook deliveries of one job store, in a daemon thread (``start``/``stop``)."""

    name = "simmim-webhooks"

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__()
        self.settings, self.sessions = settings, sessions
        self.interval_s = max(0.05, min(1.0, settings.webhook_backoff_s / 4))
        # httpcore, not an httpx.Client: only its pool takes a network backend, which is where
        # names are resolved and addresses checked. It never follows redirects or reads proxy variables.
        self.pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=10,
            network_backend=GuardedBackend(allow_private=settings.webhook_allow_private))

    def run_once(self) -> list[Outcome]:
        """Claim what is due, POST each, record each result. Returns what happened."""
        now = datetime.now(UTC)
        lease = timedelta(seconds=self.settings.webhook_timeout_s + 30)
        with self.sessions.begin() as session:
            due = [(row.id, row.job_id, row.attempts, dict(row.payload), hook)
                   for row, hook in repo.claim_webhook_deliveries(session, now=now, lease=lease)]
        outcomes = []
        for delivery_id, job_id, attempts, payload, hook in due:
            error = self._post(delivery_id, payload, hook)
            tries = attempts + 1
            retry_at = None
            if error is not None and tries < self.settings.webhook_max_attempts:
                retry_at = datetime.now(UTC) + timedelta(seconds=backoff(self.settings, tries))
            with self.sessions.begin() as session:
                repo.record_webhook_attempt(session, delivery_id=delivery_id, error=error, retry_at=retry_at)
                if error is not None and retry_at is None:
                    repo.add_event(session, job_id=job_id, type="log", data={
                        "level": "warning", "webhook_delivery": delivery_id,
                        "message": f"webhook {payload.get('type')} to {_host(hook['url'])} failed {tries} "
                                   f"times; giving up (last error: {error})"})
            if error is None:
                log.info("webhook %s delivered to %s (try %d)", delivery_id, _host(hook["url"]), tries)
            else:
                log.warning("webhook %s to %s failed (try %d of %d): %s", delivery_id, _host(hook["url"]),
                            tries, self.settings.webhook_max_attempts, error)
            outcomes.append(Outcome(delivery_id, error))
        return outcomes

    def _post(self, delivery_id: str, payload: dict[str, Any], hook: dict[str, Any]) -> str | None:
        """One try; None when the receiver answered 2xx, else what went wrong."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        stamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-SimMIM-Event-Id": delivery_id,
                   "X-SimMIM-Timestamp": stamp, "X-SimMIM-Signature": sign(str(hook["secret"]), delivery_id, stamp, body)}
        limit = self.settings.webhook_timeout_s
        try:  # only the status line and headers are read: a body that never ends cannot hold the thread
            with self.pool.stream("POST", str(hook["url"]), headers=list(headers.items()), content=body, extensions={
                    "timeout": {"connect": limit, "read": limit, "write": limit, "pool": limit}}) as response:
                status = response.status
        except _REQUEST_ERRORS as err:
            return f"{type(err).__name__}: {err}"[:500]
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self.pool.close()
