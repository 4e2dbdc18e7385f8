"""The checks every request passes before a route sees it: the Host it was sent to (DNS rebinding),
cross-origin policy, API key, body size and body time.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware) so an oversized or too slow body is
refused while it streams in, and a refused request never reaches the app.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Routes anyone may read without the key: the health probe, and the page's own static files,
# which hold no data (the page asks for the key and sends it with every API call).
PUBLIC_PATHS = ("/health", "/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
ALLOWED_HEADERS = "Authorization, Content-Type, X-Job-Id"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def host_name(host: str) -> str:
    """The name part of a Host header: "[::1]:8000" -> "::1", "Example.org.:80" -> "example.org"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


async def send_json(send: Send, status: int, message: str, param: str | None = None,
                    headers: dict[str, str] | None = None, kind: str = "invalid_request_error") -> None:
    """An error in both shapes clients expect: OpenAI's `error` object and FastAPI/A1111's `detail`."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status},
                       "detail": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Host check, CORS (refuse cross-origin writes unless allowed), Bearer auth,
    body size and time limits.

    Args:
        app: the wrapped ASGI app.
        api_key: required as `Authorization: Bearer KEY` on every non-public path, or None.
        cors_origins: origins allowed cross-origin access ("*" = any). A request is cross-origin
            when its `Origin` differs from the `Host` it was sent to.
        max_body_bytes: larger bodies get 413 (by Content-Length, or counted while streaming).
        host_names: names allowed in the `Host` header besides loopback names and IP addresses
            ("*": any). A page on another domain that rebinds its DNS name to this server sends
            that domain as its Host: refused with 421, it never reaches the API.
        body_timeout: seconds a request may take to send its whole body; then 408 and the
            connection is closed.
    """

    def __init__(self, app, api_key: str | None, cors_origins: list[str], max_body_bytes: int,
                 host_names: list[str] | tuple[str, ...] = (), body_timeout: float = 60.0) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body_bytes
        self.cors_origins = [o.rstrip("/") for o in cors_origins]
        self.host_names = {host_name(h) for h in (*LOOPBACK_NAMES, *host_names)}
        self.body_timeout = body_timeout

    def _host_allowed(self, host: str | None) -> bool:
        if host is None:  # HTTP/1.0 without Host: no browser sends that
            return True
        name = host_name(host)
        return "*" in self.host_names or name in self.host_names or is_ip(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = scope["method"], scope["path"]
        if not self._host_allowed(headers.get("host")):
            await send_json(send, 421, f"this server does not answer to the host name {headers.get('host')!r} "
                                       "(start it with --allowed-host NAME to allow it)", param="Host",
                            kind="misdirected_request")
            return
        origin = headers.get("origin")
        cross = origin is not None and urlsplit(origin).netloc != headers.get("host", "")
        allowed = cross and ("*" in self.cors_origins or origin.rstrip("/") in self.cors_origins)
        cors_headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"} if allowed else {}

        if method == "OPTIONS" and "access-control-request-method" in headers:  # CORS preflight
            if not allowed:
                await send_json(send, 403, f"cross-origin requests from {origin} are not allowed "
                                           "(start the server with --cors-origin)", kind="forbidden")
                return
            await send({"type": "http.response.start", "status": 204, "headers": [
                (k.lower().encode(), v.encode()) for k, v in {
                    **cors_headers, "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                    "Access-Control-Allow-Headers": ALLOWED_HEADERS, "Access-Control-Max-Age": "600"}.items()]})
            await send({"type": "http.response.body", "body": b""})
            return
        if cross and not allowed and method not in ("GET", "HEAD"):
            await send_json(send, 403, f"cross-origin {method} from {origin} refused "
                                       "(start the server with --cors-origin to allow it)", kind="forbidden")
            return
        if self.api_key is not None and not self._public(path) and not self._authorized(headers):
            await send_json(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                            headers={"WWW-Authenticate": "Bearer", **cors_headers}, kind="authentication_error")
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await send_json(send, 413, f"body: {length} bytes; at most {self.max_body}", param="body",
                            headers=cors_headers)
            return

        if method in ("POST", "PUT", "PATCH"):
            # Read the whole body here, within the size and time limits, and replay it to the app.
            body = await self._read_body(receive, send, cors_headers)
            if body is None:
                return
            replayed, upstream = False, receive

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await upstream()  # after the body: the disconnect, when it comes
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            receive = replay

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start" and cors_headers:
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in cors_headers.items()]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _read_body(self, receive: Receive, send: Send, cors_headers: dict[str, str]) -> bytes | None:
        """The request body, or None once a refusal was sent (413: too big; 408: not complete within
        body_timeout, however it trickles in) or the client went away."""
        chunks, size, more = [], 0, True
        deadline = time.monotonic() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await send_json(send, 408, f"body: not received within {self.body_timeout:g} s", param="body",
                                headers={"Connection": "close", **cors_headers}, kind="timeout")
                return None
            if message["type"] != "http.request":
                return None  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                await send_json(send, 413, f"body: more than {self.max_body} bytes", param="body",
                                headers=cors_headers)
                return None
        return b"".join(chunks)

    def _public(self, path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        assert self.api_key is not None
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())
