"""Run the app in a background thread on a free loopback port (tests, benchmarks, notebooks).

    with BackgroundServer(create_app(pipe)) as server:
        requests.get(server.url + "/health")
"""

from __future__ import annotations

import socket
import threading
import time

from t2i.serve.config import ServeConfig
from t2i.serve.server import build_server


class BackgroundServer:
    """The server `t2i serve` runs (timeouts, connection limit, shutdown) serving `app` on host:port
    (port 0 = a free one) in a daemon thread.

    The socket is bound here, before the thread starts, so `url` is valid at once and no other
    process can take the port in between."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config: ServeConfig = app.state.config
        self.server = build_server(app, config, self.port, log_level)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
