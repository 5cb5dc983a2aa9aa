"""KVSender: the prefill side of a transfer. Blocks leave as stored objects as prefill names them.

A prefill worker opens a transfer when the router hands it a request to prefill for a
decode worker (``open``: connect and authenticate while the request queues). After every
engine step (``after_step``, on the engine's thread) each transfer's blocks that are named
in G1 by then (computed, or cached on this side in any tier and brought up) are written to
G2 by the store's write-back path (``StoreConnector.save``: on a GPU an asynchronous copy
on a side stream) and queued. The stream thread encodes each into the stored-object format
(encrypted under the tenant's key when the store encrypts) on a small pool, one block
encoding while the one before it is sent, and sends them in order: the transfer overlaps
the rest of the prefill. A PROGRESS frame after a step tells the receiver this side is
alive while it queues or computes; END follows the last block.

A transfer that fails on this side (connection refused, dropped, the receiver gave up)
aborts its prefill request: nobody will use what it computes.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from kvgrid import keys as kvkeys
from kvgrid.engine.block_manager import EvictedBlock
from kvgrid.stats import ewma
from kvgrid.store.object import max_object_len, tenant_id
from kvgrid.store.transfer import wait_ready
from kvgrid.transfer import auth, wire
from kvgrid.transfer.faults import Faults, FaultSwitch
from kvgrid.transfer.metrics import TransferMetrics

log = logging.getLogger(__name__)

PROGRESS_S = 0.2  # a PROGRESS frame at most this often per transfer
_DEPTH = 3  # blocks encoded ahead of the one being sent
_SEND_TIMEOUT_S = 30.0
_EWMA = 0.2


class Outbound:
    """One transfer this worker sends."""

    def __init__(self, tid, ticket, endpoint, request_id, keys, parents, tenant, faults: Faults):
        self.id, self.ticket, self.endpoint, self.request_id = tid, ticket, endpoint, request_id
        self.keys, self.parents, self.tenant = keys, parents, tenant
        self.faults = faults
        self.next = 0  # blocks handed to the stream
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.attached = False  # the engine has the request (after_step feeds it)
        self.fed = False  # END queued
        self.last_progress = 0.0
        self.started = time.monotonic()
        self.attached_at: float | None = None
        self.prefill_end: float | None = None
        self.tail_s: float | None = None  # from the end of the prefill to END sent
        self.setup_s: float | None = None
        self.blocks_sent = 0
        self.bytes_sent = 0
        self.queued = False  # the next block was queued when the last one was sent
        self.outcome: str | None = None
        self.done: Future = Future()

    def summary(self) -> dict:
        return {
            "transfer_id": self.id.hex(),
            "outcome": self.outcome,
            "blocks": len(self.keys),
            "blocks_sent": self.blocks_sent,
            "bytes_sent": self.bytes_sent,
            "setup_s": self.setup_s,
            "seconds": round(time.monotonic() - self.started, 6),
            "prefill_s": (
                self.prefill_end - self.attached_at
                if self.prefill_end is not None and self.attached_at is not None
                else None
            ),
            "tail_s": self.tail_s,
        }


class _Buffers:
    """Reused object buffers: fresh memory costs more in page faults than encrypting it."""

    def __init__(self, size: int, keep: int) -> None:
        self.size, self.keep = size, keep
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def get(self) -> bytearray:
        with self._lock:
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


class KVSender:
    def __init__(
        self,
        engine: Any,
        abort_request: Callable[[str], object],
        metrics: TransferMetrics | None = None,
        faults: FaultSwitch | None = None,
        encode_threads: int = 2,
        connect_timeout_s: float = 5.0,
        codec: str = "none",
    ) -> None:
        if engine.connector is None:
            raise ValueError("a KV sender needs the engine's context store")
        self.engine = engine
        self.connector = engine.connector
        self.store = self.connector.store
        self.abort_request = abort_request
        self.metrics = metrics or TransferMetrics()
        self.faults = faults or FaultSwitch(False)
        self.connect_timeout_s = connect_timeout_s
        self.codec = codec  # KV rarely compresses; raw is the fast default on a fast link
        self.block_size = engine.config.block_size
        self.active: dict[bytes, Outbound] = {}
        self.lock = threading.Lock()
        self.setup_s: float | None = None  # measured connect + handshake (EWMA)
        self.outcomes: dict[str, int] = {}
        self.recent: deque[dict] = deque(maxlen=64)  # summaries of the last transfers
        self._encoders = ThreadPoolExecutor(encode_threads, thread_name_prefix="kvt-encode")
        self._buffers = _Buffers(max_object_len(self.connector.block_bytes), 4 * encode_threads)

    # ---- any thread --------------------------------------------------------------------

    def open(
        self,
        tid: bytes,
        ticket: bytes,
        endpoint: str,
        request_id: str,
        keys: list[bytes],
        parents,
        tenant: bytes,
    ) -> Outbound:
        """Start connecting (proving the transfer with ``ticket``); blocks flow once the
        engine has the request (``attach``)."""
        wire.parse_endpoint(endpoint)
        t = Outbound(
            tid, ticket, endpoint, request_id, list(keys), list(parents), tenant,
            self.faults.take(),
        )  # fmt: skip
        with self.lock:
            if tid in self.active:
                raise ValueError(f"transfer {tid.hex()} is already being sent")
            self.active[tid] = t
        self.metrics.active.labels("send").inc()
        threading.Thread(target=self._stream, args=(t,), name="kvt-send", daemon=True).start()
        return t

    def abort(self, tid: bytes, reason: str = "aborted") -> None:
        with self.lock:
            t = self.active.get(tid)
        if t is not None:
            t.q.put(("abort", reason))

    def state(self) -> dict:
        with self.lock:
            active = [t.summary() for t in self.active.values()]
            recent = list(self.recent)
        return {
            "active": active,
            "outcomes": dict(self.outcomes),
            "setup_s": self.setup_s,
            "recent": recent,
        }

    def close(self) -> None:
        with self.lock:
            live = list(self.active)
        for tid in live:
            self.abort(tid, "shutdown")
        self._encoders.shutdown(wait=False)

    # ---- the engine's thread ----------------------------------------------------------------

    def attach(self, t: Outbound) -> None:
        """The engine has just been given ``t``'s request (same engine-thread command)."""
        t.attached = True
        t.attached_at = t.last_progress = time.monotonic()
        t.q.put(("progress", None))

    def after_step(self) -> None:
        """Queue every block named since the last step; END once the request is done."""
        with self.lock:
            live = [t for t in self.active.values() if t.attached and not t.fed]
        if not live:
            return
        now = time.monotonic()
        for t in live:
            with self.lock:  # a stream ending meanwhile takes nothing queued after it
                if t.outcome is None and not t.fed:
                    self._feed(t, now)

    def _feed(self, t: Outbound, now: float) -> None:
        cached = self.engine.block_manager.cached
        ids: list[int] = []
        first = t.next
        while t.next < len(t.keys):
            bid = cached.get(t.keys[t.next])
            if bid is None:
                break
            ids.append(bid)
            t.next += 1
        if ids:
            self._stage(t, first, ids)
        if t.next == len(t.keys) or t.request_id not in self.engine.seqs:
            t.prefill_end = now
            t.fed = True
            t.q.put(("end", None))
        elif now - t.last_progress >= PROGRESS_S:
            t.last_progress = now
            t.q.put(("progress", None))

    def _stage(self, t: Outbound, first: int, ids: list[int]) -> None:
        keys = t.keys[first : first + len(ids)]
        g2 = self.store.g2
        if g2 is not None:
            # the store's write-back: into G2 (on a GPU asynchronously, the engine's stream
            # ordered after the copies, so a later step cannot overwrite them first), each
            # slot pinned until its block is sent
            parents = t.parents[first : first + len(ids)]
            positions = list(range(first, first + len(ids)))
            safe = self.connector.save(keys, parents, t.tenant, ids, positions=positions)
            # what the store now holds is what G1 gives up first, as for any write-back
            self.engine.block_manager.mark_below([
                EvictedBlock(b, k, p, t.tenant, position=i)
                for b, k, p, i, ok in zip(ids, keys, parents, positions, safe)
                if ok
            ])  # fmt: skip
            tid = tenant_id(t.tenant)
            for i, key in enumerate(keys):
                t.q.put(("block", (first + i, g2.acquire(tid, key), None)))
            return
        kv = self.connector.kv_cache
        for i, bid in enumerate(ids):
            t.q.put(("block", (first + i, None, kv[bid].to("cpu", copy=True))))

    # ---- the stream thread -------------------------------------------------------------------

    def _stream(self, t: Outbound) -> None:
        sock = None
        pending: deque[tuple[str, Any, Future]] = deque()
        try:
            t0 = time.monotonic()
            sock = socket.create_connection(wire.parse_endpoint(t.endpoint), self.connect_timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            auth.client_handshake(sock, t.ticket, t.id)
            sock.settimeout(_SEND_TIMEOUT_S)
            t.setup_s = time.monotonic() - t0
            self._observe_setup(t.setup_s)
        except (OSError, auth.AuthError) as e:
            log.warning("transfer %s to %s not started: %s", t.id.hex()[:12], t.endpoint, e)
            outcome = "refused" if isinstance(e, auth.AuthError) else "connect_failed"
            self._end(t, sock, pending, outcome)
            return
        try:
            outcome = self._send_all(t, sock, pending)
        except (OSError, wire.ProtocolError) as e:
            log.warning("transfer %s to %s broke: %s", t.id.hex()[:12], t.endpoint, e)
            outcome = "connection_lost"
        except Exception:
            log.exception("transfer %s to %s failed", t.id.hex()[:12], t.endpoint)
            outcome = "error"
        self._end(t, sock, pending, outcome)

    def _send_all(self, t: Outbound, sock: socket.socket, pending: deque) -> str:
        while True:
            while len(pending) < _DEPTH:
                try:
                    kind, arg = t.q.get(block=not pending, timeout=0.25)
                except queue.Empty:
                    break
                fut = self._encoders.submit(self._encode, t, *arg) if kind == "block" else None
                pending.append((kind, arg, fut))
                if kind in ("end", "abort"):
                    break
            if not pending:
                if _peer_spoke(sock):  # the receiver ended it (gave up, or cancelled)
                    return "receiver_closed"
                continue
            kind, arg, fut = pending.popleft()
            if kind == "progress":
                wire.send_frame(sock, wire.PROGRESS)
            elif kind == "abort":
                wire.send_frame(sock, wire.ABORT, 0, str(arg).encode())
                return "aborted"
            elif kind == "end":
                t.tail_s = time.monotonic() - (t.prefill_end or time.monotonic())
                wire.send_frame(sock, wire.END, t.blocks_sent, f"{t.tail_s:.6f}".encode())
                return self._result(t, sock)
            else:
                done = self._send_block(t, sock, arg[0], fut)
                if done is not None:
                    return done
                # the next block already waits: the gap to it measures the stream
                t.queued = bool(pending) or not t.q.empty()

    def _send_block(self, t: Outbound, sock, index: int, fut: Future) -> str | None:
        got = fut.result()
        if got is None:  # the block is gone from this side: the receiver recomputes the rest
            wire.send_frame(sock, wire.END, t.blocks_sent)
            return "partial"
        view, buf = got
        f = t.faults
        try:
            if f.delay_s:
                time.sleep(f.delay_s)
            if f.stall_after is not None and t.blocks_sent >= f.stall_after:
                return self._hold(sock)
            if f.drop_after is not None and t.blocks_sent >= f.drop_after:
                sock.shutdown(socket.SHUT_RDWR)
                return "dropped"
            if f.corrupt_block == index:
                view[len(view) - 20] ^= 0xFF  # inside the payload (or the GCM tag)
            aux = index | (wire.BACKLOGGED if t.queued else 0)
            wire.send_frame(sock, wire.BLOCK, aux, view)
            t.blocks_sent += 1
            t.bytes_sent += len(view)
        finally:
            self._buffers.put(buf)
        return None

    def _hold(self, sock: socket.socket) -> str:
        """A stalled stream (fault): send nothing more, keep the connection until the
        receiver gives up on it."""
        sock.settimeout(0.5)
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            try:
                if not sock.recv(1 << 16):
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        return "stalled"

    def _result(self, t: Outbound, sock: socket.socket) -> str:
        kind, _, length = wire.recv_head(sock)
        if kind != wire.RESULT:
            raise wire.ProtocolError(f"expected RESULT, got frame kind {kind}")
        return wire.recv_small(sock, length).decode() or "complete"

    def _encode(self, t: Outbound, index: int, held, host: torch.Tensor | None):
        """(object view, its buffer) of block ``index``, or None if this side lost it.
        ``held``: its pinned G2 slot (released here), or ``host``: a copy of it."""
        from kvgrid.store.object import encode_object

        key = t.keys[index]
        try:
            if held is not None:
                wait_ready([held[0]])
                host = held[1]
            elif host is None:  # G2 could not take it: from below, if anywhere
                host = self.store.get(key, t.tenant)
            if host is None:
                return None
            cfg = self.store.config
            buf = self._buffers.get()
            view = encode_object(
                host,
                key,
                t.parents[index],
                t.tenant,
                self.block_size,
                self.store.keyring,
                self.codec,
                cfg.compression_level,
                cfg.lossy_max_rel_error,
                cfg.model_fingerprint,
                kvkeys.KV_LAYOUT_VERSION,
                out=buf,
            )
            return view, buf
        except Exception:
            log.exception("encoding block %d of transfer %s failed", index, t.id.hex()[:12])
            return None
        finally:
            if held is not None:
                self.store.g2.release(held[0])

    def _end(self, t: Outbound, sock, pending: deque, outcome: str) -> None:
        for kind, _, fut in pending:  # encoded but never sent: their buffers go back
            if kind == "block":
                got = fut.result()
                if got is not None:
                    self._buffers.put(got[1])
        with self.lock:  # the engine thread queues no more; what it queued is let go
            t.outcome, t.fed = outcome, True
        while True:
            try:
                kind, arg = t.q.get_nowait()
            except queue.Empty:
                break
            if kind == "block" and arg[1] is not None:
                self.store.g2.release(arg[1][0])
        if sock is not None:
            sock.close()
        if outcome != "complete":
            self.abort_request(t.request_id)  # nobody will use what it computes
        with self.lock:
            self.active.pop(t.id, None)
            self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        m = self.metrics
        m.active.labels("send").dec()
        m.outcome("send", outcome)
        m.blocks.labels("send").inc(t.blocks_sent)
        m.bytes.labels("send").inc(t.bytes_sent)
        m.seconds.labels("send").observe(time.monotonic() - t.started)
        summary = t.summary()
        with self.lock:
            self.recent.append(summary)
        t.done.set_result(summary)

    def _observe_setup(self, seconds: float) -> None:
        self.setup_s = ewma(self.setup_s, seconds, _EWMA)


def _peer_spoke(sock: socket.socket) -> bool:
    """Whether the receiver closed the connection or wrote to it (it writes only at the
    end): a sender waiting on its prefill learns of it without sending."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)
