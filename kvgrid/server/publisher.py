"""EventPublisher: a worker's ZeroMQ PUB socket for KV event batches and load reports.

With a control key the socket is a CURVE server (encrypted; only subscribers holding the
worker's key get through its ZAP handler, kvgrid.server.auth). It has a ZeroMQ context of its
own, since a context has one ZAP handler. The engine thread publishes batches and the
heartbeat thread load reports: a lock serialises them (ZeroMQ sockets are not thread-safe),
and a report always carries the seq of the last batch sent before it, so the router never
reads a gap that is not one.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq

from kvgrid import failpoints
from kvgrid.router import wire
from kvgrid.server.auth import ControlKey, EventAuthenticator


class EventPublisher:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        epoch: str = "",
        key: ControlKey | None = None,
        worker_id: str = "",
    ) -> None:
        self.ctx = zmq.Context()
        self.auth = EventAuthenticator(self.ctx, key, worker_id) if key is not None else None
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        if key is not None:
            key.secure_publisher(self.sock, worker_id)
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
        else:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.port = port
        self.epoch = epoch
        self.last_seq = 0
        self._lock = threading.Lock()
        self._held: list[bytes] | None = None  # a batch held back (injected reordering)

    @property
    def secure(self) -> bool:
        return self.auth is not None

    def publish_events(self, batch) -> None:
        msg = [wire.TOPIC_KV, wire.encode_batch(batch, self.epoch)]
        with self._lock:
            if failpoints.ENABLED and failpoints.active().events:
                self._send_faulty(msg)
            else:
                self.sock.send_multipart(msg)
            self.last_seq = batch.seq

    def _send_faulty(self, msg: list[bytes]) -> None:
        """Send ``msg`` through the injected event faults (kvgrid.failpoints)."""
        f = failpoints.active()
        if failpoints.chance(f.event_drop):
            return
        if failpoints.chance(f.event_garble):
            msg = [msg[0], failpoints.garble(msg[1])]
        if self._held is None and failpoints.chance(f.event_reorder):
            self._held = msg
            return
        self.sock.send_multipart(msg)
        if failpoints.chance(f.event_dup):
            self.sock.send_multipart(msg)
        if self._held is not None:
            self.sock.send_multipart(self._held)
            self._held = None

    def publish_load(self, report: dict[str, Any]) -> None:
        with self._lock:
            report = {**report, "kv_seq": self.last_seq}
            self.sock.send_multipart([wire.TOPIC_LOAD, wire.encode_load(report)])

    def close(self) -> None:
        with self._lock:
            self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
