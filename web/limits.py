"""Limits against hostile clients: stalled headers, stalled bodies, too many connections or uploads.

uvicorn (0.29 to 0.54) times out an idle keep-alive connection (`timeout_keep_alive`) and caps header
size (h11, 16 KB), but it has no deadline for a request's headers: a client that connects and sends half
a header holds its socket forever. Its `limit_concurrency` answers 503 without `Retry-After`. So the
server runs uvicorn's h11 protocol with two additions (`LimitedH11Protocol`):

- bytes that do not make a complete request within `header_timeout_s` (half a header, or trailing
  data after a response) close the connection;
- beyond `max_connections` open connections, each new connection's request is answered 503 with
  `Retry-After` and the connection closed.

The app itself (web/app.py) enforces the two body limits: at most `max_uploads` request bodies in
flight (received, decoded or captioned; more: 503 with `Retry-After`), and `body_timeout_s` between two
chunks of a body (more: 408, connection closed). See docs/serving.md for what to put in front in production.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientLimits:
    """How long and how many: the server's limits against slow or greedy clients (serve.py's flags)."""

    header_timeout_s: float = 5.0  # from a connection's first byte (or its opening) to a complete request head
    body_timeout_s: float = 5.0  # longest wait for the next chunk of an upload
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this (uvicorn's timeout_keep_alive)
    max_connections: int = 128  # open connections served; beyond: 503
    max_uploads: int = 64  # request bodies in flight (received, decoded or captioned); beyond: 503
    retry_after_s: int = 2  # the Retry-After of a 503

    def __post_init__(self):
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_connections", "max_uploads", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def busy_headers(limits: ClientLimits) -> dict[str, str]:
    """Return the headers of a 503 beyond a limit: when to retry, and that the connection closes."""
    return {"Retry-After": str(limits.retry_after_s), "Connection": "close"}


def too_many_connections(limits: ClientLimits):
    """Return an ASGI app that answers every request 503 with Retry-After (the over-the-cap connections)."""
    body = json.dumps(
        {"detail": f"too many connections (at most {limits.max_connections}); retry in {limits.retry_after_s} s"}
    ).encode()
    headers = [(k.lower().encode(), v.encode()) for k, v in busy_headers(limits).items()]
    headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head deadline and a connection cap (see the module doc)."""

    limits = ClientLimits()  # replaced per server by `limited_protocol`
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("over %d open connections: answering 503", self.limits.max_connections)
            self.app = too_many_connections(self.limits)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        """True when no request is being handled: the next one's head has not (all) arrived."""
        return self.cycle is None or self.cycle.response_complete

    def _watch_head(self) -> None:
        """Start the head deadline when a connection opens or bytes arrive between requests; stop it on a request.

        An idle keep-alive connection (no byte since the last response) is uvicorn's `timeout_keep_alive`'s.
        """
        if self._waiting_for_head() and not self.transport.is_closing():
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timed_out)
        else:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            log.info("%s: no complete request in %g s, closing", self.client, self.limits.header_timeout_s)
            self.transport.close()


def limited_protocol(limits: ClientLimits) -> type[LimitedH11Protocol]:
    """Return a `LimitedH11Protocol` class bound to `limits` (uvicorn builds one instance per connection)."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})


def uvicorn_config(app, host: str, port: int, limits: ClientLimits, log_level: str = "info") -> uvicorn.Config:
    """Return the uvicorn configuration serving `app` on host:port with `limits`."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=limited_protocol(limits),
        timeout_keep_alive=limits.keep_alive_s,
        log_level=log_level,
    )
