"""KVReceiver: the decode side of a transfer. Blocks arrive as stored objects and land in G2.

A decode worker expects a transfer (``expect``: its id and ticket, the keys of the blocks
in order, the tenant, a deadline and a stall limit) before the prefill worker connects.
Each connection is authenticated with the ticket of the transfer it names (``auth``), then
its blocks are verified and decoded into G2 slots through the store's own path for objects
from below (``ContextStore.accept``), one block decoding while the next is read. The
slots stay pinned until the request has taken its KV (``release``); the engine then admits
the request and finds the blocks in G2 like any stored prefix, so the load into G1 is the
store's.

A transfer ends exactly once, with an outcome: complete; partial (the sender ended early);
rejected (a block failed verification); no_room (no G2 slot); connection_lost; stalled (no
block or sign of progress for ``stall_s``); no_connection (nobody connected within
``stall_s``); deadline; aborted (by the sender); cancelled (by the router). Whatever has
landed by then is used, the rest is recomputed: a transfer never yields wrong KV, and never
makes a decode wait past its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from kvgrid.stats import ewma
from kvgrid.store.host_pool import Slot
from kvgrid.store.object import max_object_len
from kvgrid.store.store import ContextStore
from kvgrid.transfer import auth, wire
from kvgrid.transfer.metrics import TransferMetrics
from kvgrid.transfer.probe import PROBE_TTL_S, ExpectedProbes, serve_probe

log = logging.getLogger(__name__)

_WATCH_S = 0.02
_MAX_CONNECTIONS = 256
_HANDSHAKE_S = 5.0
_EWMA = 0.2
_RELEASE_WAIT_S = 5.0  # bound on waiting for a block in verification at release


class _Arrived:
    """One received object presented as a tier, so the store verifies and promotes it as it
    does an object read from G3/G4 (its failures count under tier "transfer")."""

    name = "transfer"
    backend = "network"
    up = True

    def __init__(self, blob: memoryview) -> None:
        self.blob = blob

    def get(self, tid: bytes, key: bytes, buf=None) -> memoryview:
        return self.blob

    def delete(self, tid: bytes, key: bytes) -> bool:
        return False  # nothing stored: a bad object is simply not taken


_RELEASE_WAIT_S = 5.0


class Inbound:
    """One expected transfer."""

    def __init__(
        self,
        tid: bytes,
        ticket: bytes,
        keys: list[bytes],
        tenant: bytes,
        deadline: float,
        stall_s: float,
    ):
        now = time.monotonic()
        self.id, self.ticket, self.keys, self.tenant = tid, ticket, keys, tenant
        self.deadline, self.stall_s = deadline, stall_s
        self.created = self.last_progress = now
        self.connected_at: float | None = None
        self.first_block_at: float | None = None
        self.ended_at: float | None = None
        self.slots: list[Slot] = []  # the leading run landed, in order, until released
        self.n_landed = 0
        # blocks done ahead of an earlier one: (slot or None, bytes, why not)
        self.ready: dict[int, tuple[Slot | None, int, str]] = {}
        self.decoding = 0  # blocks on the landing threads
        self.bytes = 0
        self.outcome: str | None = None
        self.prefill_tail_s: float | None = None
        self.sock: socket.socket | None = None
        self.done: Future = Future()
        self.lock = threading.Lock()
        self._idle = threading.Condition(self.lock)

    def landing_done(self) -> None:
        with self.lock:
            self.decoding -= 1
            self._idle.notify_all()

    def wait_landed(self, timeout_s: float | None = None) -> bool:
        with self.lock:
            return self._idle.wait_for(lambda: self.decoding == 0, timeout_s)

    @property
    def landed(self) -> int:
        return self.n_landed

    def summary(self) -> dict:
        t0 = self.connected_at or self.created
        return {
            "transfer_id": self.id.hex(),
            "outcome": self.outcome,
            "expected_blocks": len(self.keys),
            "landed_blocks": self.landed,
            "bytes": self.bytes,
            "seconds": round((self.ended_at or time.monotonic()) - t0, 6),
            # from the first block's arrival to the end: what the stream itself took
            "stream_s": (
                round(self.ended_at - self.first_block_at, 6)
                if self.ended_at is not None and self.first_block_at is not None
                else None
            ),
            "prefill_tail_s": self.prefill_tail_s,
        }


class KVReceiver:
    def __init__(
        self,
        store: ContextStore,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        metrics: TransferMetrics | None = None,
        decode_threads: int = 2,
    ) -> None:
        if store.block_shape is None or store.g2 is None:
            raise ValueError("a KV receiver needs the context store's G2 with its block shape set")
        self.store = store
        self.metrics = metrics or TransferMetrics()
        nbytes = int(store.g2.slot_bytes) or 0
        self.max_object = max_object_len(nbytes)
        self.server = socket.create_server((host, port))
        self.endpoint = f"{advertise_host or host}:{self.server.getsockname()[1]}"
        self.transfers: dict[bytes, Inbound] = {}
        self.probes = ExpectedProbes(_MAX_CONNECTIONS)
        self.lock = threading.Lock()
        self.bytes_per_s: float | None = None  # measured stream bandwidth
        self._gap: tuple[float, float] | None = None  # EWMAs of a queued block's bytes, gap
        self.outcomes: dict[str, int] = {}
        self.recent: deque[dict] = deque(maxlen=64)  # summaries of the last transfers
        self._decoders = ThreadPoolExecutor(decode_threads, thread_name_prefix="kvt-land")
        self._stop = threading.Event()
        self._conns = threading.BoundedSemaphore(_MAX_CONNECTIONS)
        self._threads = [
            threading.Thread(target=self._accept_loop, name="kvt-accept", daemon=True),
            threading.Thread(target=self._watch, name="kvt-watch", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ---- the decode worker's calls ---------------------------------------------------------

    def expect(
        self,
        tid: bytes,
        ticket: bytes,
        keys: list[bytes],
        tenant: bytes,
        deadline_s: float,
        stall_s: float,
    ) -> Inbound:
        """Register a transfer about to start, which a sender proves with ``ticket``; its
        ``done`` future resolves when it ends."""
        auth.check_grant(tid, ticket)
        t = Inbound(tid, ticket, list(keys), tenant, time.monotonic() + deadline_s, stall_s)
        with self.lock:
            if tid in self.transfers or tid in self.probes:
                raise ValueError(f"transfer {tid.hex()} is already expected")
            self.transfers[tid] = t
        self.metrics.active.labels("receive").inc()
        if not keys:
            self._finish(t, "complete")
        return t

    def expect_probe(self, pid: bytes, ticket: bytes, ttl_s: float = PROBE_TTL_S) -> None:
        """Accept one bandwidth probe (``kvgrid.transfer.probe``) with id ``pid`` within
        ``ttl_s``, proved with ``ticket``."""
        with self.lock:
            if pid in self.transfers:
                raise ValueError(f"transfer {pid.hex()} is already expected")
            self.probes.add(pid, ticket, ttl_s)

    def cancel(self, tid: bytes, reason: str = "cancelled") -> bool:
        with self.lock:
            t = self.transfers.get(tid)
        if t is None:
            return False
        if t.sock is not None and _closed_by_peer(t.sock):
            # the sender is gone already (the router cancels because its prefill failed,
            # often for that very reason): that is how the transfer ended
            reason = "connection_lost"
        return self._finish(t, reason)

    def release(self, t: Inbound) -> None:
        """The request has taken its KV (or ended): unpin the slots, forget the transfer."""
        self._finish(t, "cancelled")  # no-op once it has ended
        # a block still decoding lands as a stray and unpins itself: wait for it (one
        # block's verification), so that nothing of this transfer is pinned once it is gone
        if not t.wait_landed(_RELEASE_WAIT_S):
            log.warning("transfer %s released with a block still landing", t.id.hex()[:12])
        with t.lock:
            slots, t.slots = t.slots, []
        if slots:
            self.store.g2.release_run(slots)
        with self.lock:
            if self.transfers.get(t.id) is t:
                del self.transfers[t.id]
                self.recent.append(t.summary())
                self.metrics.active.labels("receive").dec()

    def state(self) -> dict:
        with self.lock:
            active = [t.summary() for t in self.transfers.values()]
            recent = list(self.recent)
        return {
            "endpoint": self.endpoint,
            "active": active,
            "outcomes": dict(self.outcomes),
            "bytes_per_s": self.bytes_per_s,
            "recent": recent,
        }

    def close(self) -> None:
        self._stop.set()
        self.server.close()
        with self.lock:
            pending = list(self.transfers.values())
        for t in pending:
            self.release(t)
        self._decoders.shutdown(wait=True)

    # ---- ending a transfer -----------------------------------------------------------------

    def _finish(self, t: Inbound, outcome: str) -> bool:
        """End ``t`` with ``outcome`` unless it has ended; wakes its waiter, closes its socket."""
        with t.lock:
            if t.outcome is not None:
                return False
            t.outcome = outcome
            t.ended_at = time.monotonic()
            sock = t.sock
            stray = [s for s, _, _ in t.ready.values() if s is not None]
            t.ready.clear()
        if stray:
            self.store.g2.release_run(stray)
        if sock is not None and outcome != "complete":
            _shutdown(sock)  # the reader thread stops; whatever it holds is released there
        with self.lock:
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        m = self.metrics
        m.outcome("receive", outcome)
        m.blocks.labels("receive").inc(t.landed)
        m.bytes.labels("receive").inc(t.bytes)
        if t.connected_at is not None:
            m.seconds.labels("receive").observe(t.ended_at - t.connected_at)
        if outcome != "complete":
            log.warning(
                "transfer %s ended %s with %d of %d blocks: the rest is recomputed",
                t.id.hex()[:12],
                outcome,
                t.landed,
                len(t.keys),
            )
        t.done.set_result(t)
        return True

    def _watch(self) -> None:
        while not self._stop.wait(_WATCH_S):
            now = time.monotonic()
            with self.lock:
                live = [t for t in self.transfers.values() if t.outcome is None]
            for t in live:
                if now > t.deadline:
                    self._finish(t, "deadline")
                elif now - t.last_progress > t.stall_s:
                    self._finish(t, "stalled" if t.connected_at is not None else "no_connection")

    # ---- connections -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            # a connection costs a thread until its handshake fails (or its transfer ends):
            # beyond the limit, a flood of them is turned away instead of served
            if not self._conns.acquire(blocking=False):
                conn.close()
                log.warning("transfer connection refused: %d open", _MAX_CONNECTIONS)
                continue
            threading.Thread(target=self._serve, args=(conn,), name="kvt-conn", daemon=True).start()

    def _claim(self, tid: bytes) -> tuple[int, bytes | None]:
        """(status, ticket) of the transfer or probe ``tid`` names; changes nothing."""
        probe = self.probes.claim(tid)
        if probe is not None:
            return probe
        with self.lock:
            t = self.transfers.get(tid)
        if t is None:
            return auth.UNKNOWN, None
        if t.outcome is not None:
            return auth.UNKNOWN, t.ticket
        return (auth.OK if t.sock is None else auth.BUSY), t.ticket

    def _serve(self, conn: socket.socket) -> None:
        t = None
        try:
            conn.settimeout(_HANDSHAKE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tid, status = auth.server_handshake(conn, self._claim)
            if status != auth.OK:
                return
            conn.settimeout(None)
            if self.probes.take(tid):
                serve_probe(conn)
                return
            with self.lock:
                found = self.transfers.get(tid)
            if found is None:
                return  # released between the handshake and here
            with found.lock:
                if found.outcome is not None or found.sock is not None:
                    return
                found.sock = conn
                found.connected_at = found.last_progress = time.monotonic()
            t = found
            self._receive(conn, t)
        except (OSError, auth.AuthError, wire.ProtocolError) as e:
            if t is not None:
                self._finish(t, "connection_lost")
            else:
                log.warning("transfer connection refused: %s", e)
        except Exception:
            log.exception("transfer connection failed")
            if t is not None:
                self._finish(t, "error")
        finally:
            if t is not None and t.outcome is not None:
                with contextlib.suppress(OSError):
                    wire.send_frame(conn, wire.RESULT, t.landed, t.outcome.encode())
            conn.close()
            self._conns.release()

    def _receive(self, conn: socket.socket, t: Inbound) -> None:
        """Frames until the transfer ends. Blocks decode on the landing threads while the
        next ones are read, and land (join the transfer's leading run) as soon as they and
        every block before them have."""
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(2):
            free.put(bytearray(self.max_object))
        prev_at: float | None = None
        ended = False  # the sender's END or ABORT has been read
        submitted = 0
        try:
            while t.outcome is None or (t.outcome == "complete" and not ended):
                if t.outcome == "complete":
                    conn.settimeout(_HANDSHAKE_S)  # its END follows the last block at once
                kind, aux, length = wire.recv_head(conn)
                now = time.monotonic()
                if kind == wire.BLOCK:
                    index = aux & ~wire.BACKLOGGED
                    if index != submitted or index >= len(t.keys):
                        raise wire.ProtocolError(f"block {index} out of order")
                    if length > self.max_object:
                        raise wire.ProtocolError(f"block object of {length} bytes")
                    buf = free.get()  # a landing hands its buffer back
                    view = memoryview(buf)[:length]
                    wire.recv_into(conn, view)
                    if aux & wire.BACKLOGGED and prev_at is not None:
                        self._observe(length, now - prev_at)
                    prev_at = now
                    if t.first_block_at is None:
                        t.first_block_at = now
                    with t.lock:
                        t.decoding += 1
                    self._decoders.submit(self._land, t, index, buf, length, free)
                    submitted += 1
                    continue
                t.wait_landed()  # control frames act once every earlier block has landed
                payload = wire.recv_small(conn, length)
                if kind == wire.PROGRESS:
                    t.last_progress = now
                elif kind == wire.END:
                    ended = True
                    if payload:
                        t.prefill_tail_s = float(payload.decode())
                        self.metrics.tail.observe(t.prefill_tail_s)
                    if t.landed < len(t.keys):
                        self._finish(t, "partial")
                elif kind == wire.ABORT:
                    ended = True
                    self._finish(t, "aborted")
                else:
                    raise wire.ProtocolError(f"unexpected frame kind {kind}")
        finally:
            t.wait_landed()  # decodes in flight: their slots must not leak

    def _land(self, t: Inbound, index: int, buf: bytearray, length: int, free) -> None:
        """On a landing thread: verify block ``index`` into G2, then join it to the run."""
        try:
            slot, why = self.store.accept(
                _Arrived(memoryview(buf)[:length]), t.keys[index], t.tenant
            )
        except Exception:
            log.exception("landing a transferred block failed")
            slot, why = None, "rejected"
        finally:
            free.put(buf)
        stray: list[Slot] = []
        failed = None
        with t.lock:
            if t.outcome is None:
                # in order: a block that fails ends the transfer only once every block
                # before it has landed (one decoding on the other thread still counts)
                t.ready[index] = (slot, length, why)
                while t.landed in t.ready:
                    s, n, w = t.ready.pop(t.landed)
                    if s is None:
                        failed = w
                        break
                    t.slots.append(s)
                    t.n_landed += 1
                    t.bytes += n
                    t.last_progress = time.monotonic()
            elif slot is not None:
                stray.append(slot)  # the transfer ended meanwhile: nobody will use it
            complete = t.outcome is None and failed is None and t.landed == len(t.keys)
        for s in stray:
            self.store.g2.release(s)
        if failed is not None:
            self._finish(t, failed)
        elif complete:
            self._finish(t, "complete")
        t.landing_done()

    def _observe(self, nbytes: int, seconds: float) -> None:
        """One gap between two queued blocks. Bytes and seconds are averaged apart: a
        reader held up for a moment reads the next header at once, and averaging the rates
        of such short and long gaps would overstate the stream."""
        if seconds <= 0:
            return
        b, t = self._gap or (None, None)
        self._gap = (ewma(b, float(nbytes), _EWMA), ewma(t, seconds, _EWMA))
        self.bytes_per_s = self._gap[0] / self._gap[1]
        self.metrics.bandwidth.set(self.bytes_per_s)


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the peer has closed the connection and nothing of it is left unread."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False  # open, nothing to read
    except OSError:
        return True  # reset by the peer


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
