"""An actor's HTTP server: uvicorn on a socket of its own, in a thread of its own.

A Ray actor's methods run on Ray's threads; the server that carries requests, streams and
KV snapshots runs beside them on its own event loop, exactly as `kvgrid worker` and
`kvgrid router` run it, so Ray is not on the data path. The socket is bound before the
server starts, so the port is known (and held) before anyone is told about it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

log = logging.getLogger(__name__)


def bind(host: str, port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class HTTPThread(threading.Thread):
    def __init__(self, app, sock: socket.socket, name: str) -> None:
        import uvicorn

        super().__init__(name=name, daemon=True)
        self.sock = sock
        config = uvicorn.Config(app, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.error: BaseException | None = None

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def run(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        except BaseException as e:  # reported by serving() and the watchdog
            self.error = e
            log.exception("%s: HTTP server failed", self.name)

    def start_serving(self, timeout_s: float = 600.0) -> None:
        """Start, and return once it accepts requests (its app's start-up has run)."""
        self.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: HTTP server did not start: {self.error!r}")
            time.sleep(0.02)

    def serving(self) -> bool:
        return self.is_alive() and self.error is None

    def stop(self, timeout_s: float = 60.0) -> None:
        """Graceful: the app's shutdown runs (a worker's engine writes its blocks down)."""
        self.server.should_exit = True
        self.join(timeout_s)
