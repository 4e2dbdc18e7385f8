"""Slow and numerous clients: a connection that trickles its headers or its body is dropped after
the configured timeout, /health answers while slow sockets are open, and connections beyond the
limit are answered 503 at once. Loopback only, short timeouts, every loop bounded."""

from __future__ import annotations

import select
import socket
import time
from contextlib import ExitStack

import pytest

pytest.importorskip("fastapi")

from test_serve import model_folder_fixture, pipe_fixture, request, serve  # noqa: E402, F401 - shared fixtures, helpers

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 1.5  # header and body timeouts of these servers, seconds
SLOW = {"header_timeout": TIMEOUT, "body_timeout": TIMEOUT, "max_connections": 12}


def trickle(sock: socket.socket, data: bytes, interval: float, limit: float) -> tuple[float | None, bytes]:
    """Send `data` a byte every `interval` s until the server closes the connection.
    Returns (seconds until it did, or None if it had not after `limit` s; what it sent back)."""
    t0, reply = time.monotonic(), b""
    for b in data:
        elapsed = time.monotonic() - t0
        if elapsed > limit:
            return None, reply
        try:
            sock.sendall(bytes([b]))
            if select.select([sock], [], [], interval)[0]:
                chunk = sock.recv(4096)
                reply += chunk
                if not chunk:
                    return time.monotonic() - t0, reply
        except OSError:  # reset by the server
            return time.monotonic() - t0, reply
    return None, reply


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_a_client_trickling_its_headers_is_dropped(pipe):
    with serve(pipe, **SLOW) as s, connect(s.port) as sock:
        closed, _ = trickle(sock, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 0.4, limit=6)
        # 43 bytes at 0.4 s would take 17 s: the server closed it at its header timeout.
        assert closed is not None and TIMEOUT - 0.1 < closed < TIMEOUT + 1.5, closed


def test_a_client_trickling_its_body_gets_408(pipe):
    with serve(pipe, **SLOW) as s, connect(s.port) as sock:
        sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 200\r\n\r\n")
        closed, reply = trickle(sock, b'{"prompt": "' + b"x" * 180 + b'"}', 0.4, limit=6)
        assert closed is not None and closed < TIMEOUT + 1.5, closed
        assert reply.startswith(b"HTTP/1.1 408") and b"body" in reply
        assert not s.queue.jobs


def test_health_answers_while_slow_sockets_are_open_and_extra_connections_get_503(pipe):
    with serve(pipe, **SLOW) as s, ExitStack() as stack:
        slow = [stack.enter_context(connect(s.port)) for _ in range(8)]
        for sock in slow:
            sock.sendall(b"GET /health HTTP/1.1\r\nHo")  # half a request, the rest never comes
        t0 = time.monotonic()
        code, _, health = request("GET", s.url + "/health", timeout=5)
        assert code == 200 and health["status"] == "ok" and time.monotonic() - t0 < 1.0
        # Beyond max_connections (12) a connection is answered 503 and closed at once.
        extra = [stack.enter_context(connect(s.port)) for _ in range(6)]
        replies = []
        for sock in extra:
            sock.settimeout(0.5)
            try:
                replies.append(sock.recv(4096))
            except TimeoutError:
                replies.append(b"")  # accepted (under the limit): waits for a request
        assert sum(r.startswith(b"HTTP/1.1 503") for r in replies) >= 2, replies
        # The slow ones are dropped at the header timeout; then the server has room again.
        time.sleep(TIMEOUT + 0.5)
        dropped = 0
        for sock in slow:
            try:
                dropped += select.select([sock], [], [], 0.5)[0] != [] and sock.recv(16) == b""
            except OSError:
                dropped += 1
        assert dropped == len(slow)
        assert request("GET", s.url + "/health", timeout=5)[0] == 200


def test_the_connection_limit_stays_below_the_file_limit(monkeypatch):
    import resource

    from t2i.serve.server import connection_cap

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (256, 4096))
    assert connection_cap(300) == 224 and connection_cap(100) == 100
