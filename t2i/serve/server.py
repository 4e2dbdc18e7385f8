"""uvicorn, set up for t2i: header deadlines and a connection limit at the protocol, and a shutdown
that stops the model first.

uvicorn's own protocol has a keep-alive timeout but no deadline for a request's headers: a client
that sends a byte every few seconds holds its connection (and a file descriptor) forever. Here
every connection must deliver each request's complete headers within `header_timeout` seconds,
and connections beyond `max_connections` are answered 503 and closed at once. The body's deadline
is the Guard's (an ASGI middleware), which answers 408.

On SIGTERM / SIGINT uvicorn stops accepting and then waits for open requests to finish; a request
waiting for a long generation would hold it for as long as the job runs. `T2IServer.shutdown`
first closes the job queue (waiting jobs are answered 503, the running batch stops within a
fraction of a step), so the open requests end at once and the process exits within seconds.
"""

from __future__ import annotations

import asyncio
import socket

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from t2i.serve.config import ServeConfig
from t2i.serve.jobs import JobQueue

OVERLOADED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\nconnection: close\r\n"
              b"content-length: 29\r\n\r\ntoo many connections; retry\r\n")
GRACEFUL_SECONDS = 5  # after the queue is closed, what open requests get to finish their answers


class DeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a connection limit."""

    header_timeout: float = 10.0
    max_connections: int = 128

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(OVERLOADED)
            transport.close()
            return
        self._arm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm_header_deadline()  # the next request on this keep-alive connection

    def _arm_header_deadline(self) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _header_deadline_passed(self) -> None:
        # Waiting for headers: h11 has not seen a complete request line + headers since the deadline was armed.
        waiting = self.conn.their_state in (h11.IDLE, h11.DONE) and (self.cycle is None or self.cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        handle = getattr(self, "_header_deadline", None)
        if handle is not None:
            handle.cancel()
        super().connection_lost(exc)


class T2IServer(uvicorn.Server):
    """uvicorn.Server whose shutdown closes the job queue before waiting for open requests."""

    def __init__(self, config: uvicorn.Config, queue: JobQueue) -> None:
        super().__init__(config)
        self.queue = queue

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.queue.close()
        await super().shutdown(sockets)


def connection_cap(wanted: int, spare: int = 32) -> int:
    """`wanted`, or fewer where the process may not open that many files: each connection is a file
    descriptor, and the model, the decoders and the logs need `spare` more."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # no resource module (Windows)
        return wanted
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - spare))


def build_server(app, config: ServeConfig, port: int = 8000, log_level: str = "info") -> T2IServer:
    """The uvicorn server for an app of `create_app`, with the config's timeouts and limits."""
    protocol = type("Protocol", (DeadlineProtocol,), {"header_timeout": config.header_timeout,
                                                       "max_connections": connection_cap(config.max_connections)})
    uv = uvicorn.Config(app, host=config.host, port=port, log_level=log_level, http=protocol,
                        timeout_keep_alive=config.keep_alive, timeout_graceful_shutdown=GRACEFUL_SECONDS)
    return T2IServer(uv, app.state.queue)
