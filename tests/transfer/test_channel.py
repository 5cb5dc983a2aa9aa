"""The KV transfer channel on real sockets and a real context store: authentication, blocks
landing in G2 verified, every way a transfer can end, and no G2 slot left pinned.

The sending side here is written frame by frame with the wire and auth modules (the engine's
sender is exercised end to end, with real worker processes, in tests/server/test_disagg_live.py),
so each test can send exactly the damaged, missing or misordered stream it is about.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

import pytest
import torch

from kvgrid import keys as kvkeys
from kvgrid.server.auth import ControlKey
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing
from kvgrid.store.object import encode_object, tenant_id
from kvgrid.transfer import auth, wire
from kvgrid.transfer.model import TransferModel
from kvgrid.transfer.probe import probe_link
from kvgrid.transfer.receiver import KVReceiver

SHAPE = (2, 2, 16, 2, 8)  # layers, K/V, block tokens, kv heads, head dim
TENANT = b"tenant-a"
CLUSTER = ControlKey.generate()  # the router's
WORKER = CLUSTER.for_worker("d0")  # the receiving worker's own key: all it holds


@pytest.fixture
def store():
    keyring = KeyRing({1: os.urandom(32)})
    s = ContextStore(StoreConfig(g2_bytes=1 << 20, sweep_interval_s=0), keyring=keyring)
    s.configure_blocks(SHAPE, torch.float32)
    yield s
    s.close()


@pytest.fixture
def receiver(store):
    r = KVReceiver(store)
    yield r
    r.close()


def _expect(receiver: KVReceiver, keys, deadline_s: float = 30, stall_s: float = 10, tid=None):
    """A transfer the receiving worker expects, with the ticket it derives from its own key."""
    tid = tid or os.urandom(16)
    ticket = WORKER.transfer_ticket("d0", tid)
    return receiver.expect(tid, ticket, keys, TENANT, deadline_s, stall_s)


def _blocks(n: int, seed: int = 0) -> tuple[list[bytes], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    keys = kvkeys.block_keys(list(range(16 * n)), kvkeys.KVScope("m", "float32").digest, 16)
    return keys, [torch.randn(SHAPE, generator=g) for _ in range(n)]


def _object(store: ContextStore, key: bytes, block: torch.Tensor, tenant: bytes = TENANT) -> bytes:
    return encode_object(block, key, None, tenant, 16, store.keyring, "none")


def _connect(receiver: KVReceiver, tid: bytes, ticket: bytes | None = None) -> socket.socket:
    """A sender proving ``tid`` with ``ticket`` (default: the one the router grants it,
    derived from the cluster key)."""
    sock = socket.create_connection(wire.parse_endpoint(receiver.endpoint), 5)
    try:
        auth.client_handshake(sock, ticket or CLUSTER.transfer_ticket("d0", tid), tid)
    except BaseException:
        sock.close()
        raise
    return sock


def _result(sock: socket.socket) -> str:
    kind, _, length = wire.recv_head(sock)
    assert kind == wire.RESULT
    return wire.recv_small(sock, length).decode()


def _wait(t, timeout: float = 10.0):
    return t.done.result(timeout)


def _in_g2(store: ContextStore, key: bytes) -> torch.Tensor | None:
    got = store.g2.acquire(tenant_id(TENANT), key)
    if got is None:
        return None
    store.g2.release(got[0])
    return got[1]


def test_blocks_land_in_g2_verified_and_are_released(store, receiver):
    keys, blocks = _blocks(5)
    tid = os.urandom(16)
    t = _expect(receiver, keys, 30, 10, tid)
    sock = _connect(receiver, tid)
    for i, (k, b) in enumerate(zip(keys, blocks)):
        wire.send_frame(sock, wire.BLOCK, i | wire.BACKLOGGED, _object(store, k, b))
    wire.send_frame(sock, wire.END, 5, b"0.001")
    assert _result(sock) == "complete"
    sock.close()
    assert _wait(t).outcome == "complete" and t.landed == 5
    for k, b in zip(keys, blocks):
        assert torch.equal(_in_g2(store, k), b)
    assert store.g2.pinned_count() == 5  # held for the request until it takes them
    receiver.release(t)
    assert store.g2.pinned_count() == 0 and not receiver.transfers
    assert receiver.bytes_per_s and receiver.bytes_per_s > 0
    assert receiver.outcomes == {"complete": 1}


@pytest.mark.parametrize("damage", ["flip", "other_key", "other_tenant"])
def test_a_damaged_or_misplaced_block_ends_the_transfer_with_the_run_before_it(
    store, receiver, damage
):
    keys, blocks = _blocks(4, seed=1)
    tid = os.urandom(16)
    t = _expect(receiver, keys, 30, 10, tid)
    sock = _connect(receiver, tid)
    objs = [bytearray(_object(store, k, b)) for k, b in zip(keys, blocks)]
    if damage == "flip":
        objs[2][-20] ^= 0xFF
    elif damage == "other_key":
        objs[2] = bytearray(_object(store, keys[3], blocks[2]))
    else:
        objs[2] = bytearray(_object(store, keys[2], blocks[2], tenant=b"tenant-b"))
    try:
        for i, o in enumerate(objs):
            wire.send_frame(sock, wire.BLOCK, i, o)
    except OSError:
        pass  # the receiver may close before the last block is written
    assert _wait(t).outcome == "rejected"
    assert t.landed == 2 and _in_g2(store, keys[2]) is None
    sock.close()
    receiver.release(t)
    assert store.g2.pinned_count() == 0
    # counted as an integrity failure (or a mismatch miss) of tier "transfer"
    assert store.metrics.total("integrity_failures", tier="transfer") == 1


def test_an_unauthenticated_peer_or_unknown_transfer_is_refused(store, receiver):
    keys, blocks = _blocks(1)
    tid = os.urandom(16)
    t = _expect(receiver, keys, tid=tid)
    # no ticket, someone else's ticket, another transfer's ticket, another worker's key
    for ticket in (
        auth.new_ticket(),
        ControlKey.generate().transfer_ticket("d0", tid),
        CLUSTER.transfer_ticket("d0", os.urandom(16)),
        CLUSTER.transfer_ticket("d1", tid),
    ):
        with pytest.raises(auth.AuthError, match="rejected this transfer's ticket"):
            _connect(receiver, tid, ticket)
    assert t.outcome is None and t.sock is None  # refused peers never got the transfer
    with pytest.raises(auth.AuthError, match="unknown transfer"):
        _connect(receiver, os.urandom(16))
    sock = _connect(receiver, tid)  # the router's ticket opens it
    with pytest.raises(auth.AuthError, match="busy"):  # one connection per transfer
        _connect(receiver, tid)
    wire.send_frame(sock, wire.BLOCK, 0, _object(store, keys[0], blocks[0]))
    wire.send_frame(sock, wire.END, 1)
    assert _result(sock) == "complete"
    sock.close()
    assert _wait(t).outcome == "complete"
    receiver.release(t)
    with pytest.raises(auth.AuthError, match="unknown transfer"):  # ended: not again
        _connect(receiver, tid)
    assert store.g2.pinned_count() == 0


def test_a_refused_peer_sends_no_block(store, receiver):
    """Frames from a peer that failed the handshake are never read: nothing lands."""
    keys, blocks = _blocks(1)
    tid = os.urandom(16)
    t = _expect(receiver, keys, tid=tid)
    sock = socket.create_connection(wire.parse_endpoint(receiver.endpoint), 5)
    hello = auth.recv_exact(sock, auth._HELLO.size)
    assert hello[:4] == auth.MAGIC
    sock.sendall(auth._CLIENT.pack(tid, os.urandom(16), os.urandom(32)))
    with contextlib.suppress(OSError):
        wire.send_frame(sock, wire.BLOCK, 0, _object(store, keys[0], blocks[0]))
        wire.send_frame(sock, wire.END, 1)
    status, _ = auth._REPLY.unpack(auth.recv_exact(sock, auth._REPLY.size))
    assert status == auth.BAD_AUTH
    sock.close()
    time.sleep(0.2)
    assert t.outcome is None and t.landed == 0 and _in_g2(store, keys[0]) is None
    receiver.release(t)


def test_a_receiver_that_fails_its_proof_is_not_trusted(store):
    """The sender checks the receiver's side of the handshake too."""
    srv = socket.create_server(("127.0.0.1", 0))

    def impostor():
        conn, _ = srv.accept()
        conn.sendall(auth._HELLO.pack(auth.MAGIC, auth.VERSION, os.urandom(16)))
        auth.recv_exact(conn, auth._CLIENT.size)
        conn.sendall(auth._REPLY.pack(auth.OK, os.urandom(32)))
        conn.close()

    import threading

    th = threading.Thread(target=impostor)
    th.start()
    sock = socket.create_connection(srv.getsockname(), 5)
    with pytest.raises(auth.AuthError, match="failed the transfer handshake"):
        auth.client_handshake(sock, auth.new_ticket(), os.urandom(16))
    th.join()
    sock.close()
    srv.close()


def test_stall_no_connection_deadline_partial_and_order(store, receiver):
    keys, blocks = _blocks(3, seed=2)
    # stalled: one block, then silence while the connection stays open
    t1 = _expect(receiver, keys, 30, 0.3)
    s1 = _connect(receiver, t1.id)
    wire.send_frame(s1, wire.BLOCK, 0, _object(store, keys[0], blocks[0]))
    t0 = time.monotonic()
    assert _wait(t1).outcome == "stalled" and t1.landed == 1
    assert time.monotonic() - t0 < 5
    # PROGRESS frames keep a slow prefill alive past the stall limit
    t2 = _expect(receiver, keys, 30, 0.3)
    s2 = _connect(receiver, t2.id)
    for _ in range(4):
        time.sleep(0.15)
        wire.send_frame(s2, wire.PROGRESS)
    for i, (k, b) in enumerate(zip(keys, blocks)):
        wire.send_frame(s2, wire.BLOCK, i, _object(store, k, b))
    wire.send_frame(s2, wire.END, 3)
    assert _wait(t2).outcome == "complete"
    # nobody connects
    t3 = _expect(receiver, keys, 30, 0.2)
    assert _wait(t3).outcome == "no_connection"
    # the deadline bounds a transfer that keeps showing progress
    t4 = _expect(receiver, keys, 0.5, 0.5)
    s4 = _connect(receiver, t4.id)
    for _ in range(10):
        if t4.outcome is not None:
            break
        time.sleep(0.1)
        try:
            wire.send_frame(s4, wire.PROGRESS)
        except OSError:
            break
    assert _wait(t4).outcome == "deadline"
    # the sender ends early: partial
    t5 = _expect(receiver, keys, 30, 10)
    s5 = _connect(receiver, t5.id)
    wire.send_frame(s5, wire.BLOCK, 0, _object(store, keys[0], blocks[0]))
    wire.send_frame(s5, wire.END, 1)
    assert _wait(t5).outcome == "partial" and t5.landed == 1
    # a block out of order breaks the protocol
    t6 = _expect(receiver, keys, 30, 10)
    s6 = _connect(receiver, t6.id)
    wire.send_frame(s6, wire.BLOCK, 1, _object(store, keys[1], blocks[1]))
    assert _wait(t6).outcome == "connection_lost" and t6.landed == 0
    # cancelled by the router; with its sender still connected, too
    t7 = _expect(receiver, keys, 30, 10)
    assert receiver.cancel(t7.id) and _wait(t7).outcome == "cancelled"
    t8 = _expect(receiver, keys, 30, 10)
    s8 = _connect(receiver, t8.id)
    assert receiver.cancel(t8.id) and _wait(t8).outcome == "cancelled"
    for s in (s1, s2, s4, s5, s6, s8):
        s.close()
    for t in (t1, t2, t3, t4, t5, t6, t7, t8):
        receiver.release(t)
    assert store.g2.pinned_count() == 0 and not receiver.transfers


def test_probe_measures_the_raw_channel_once_expected(receiver):
    pid = os.urandom(16)
    ticket = CLUSTER.transfer_ticket("d0", pid)
    with pytest.raises(auth.AuthError, match="unknown transfer"):  # not expected yet
        probe_link(receiver.endpoint, pid, ticket, 1 << 20)
    receiver.expect_probe(pid, WORKER.transfer_ticket("d0", pid))
    with pytest.raises(auth.AuthError, match="ticket"):
        probe_link(receiver.endpoint, pid, auth.new_ticket(), 1 << 20)
    out = probe_link(receiver.endpoint, pid, ticket, 3 << 20, chunk=1 << 20)
    assert out["bytes"] == 3 << 20 and out["receiver"]["bytes"] == 3 << 20
    assert out["bytes_per_s"] > 0
    with pytest.raises(auth.AuthError, match="unknown transfer"):  # one use
        probe_link(receiver.endpoint, pid, ticket, 1 << 20)
    late = os.urandom(16)
    receiver.expect_probe(late, WORKER.transfer_ticket("d0", late), ttl_s=0.05)
    time.sleep(0.1)
    with pytest.raises(auth.AuthError, match="unknown transfer"):  # expired
        probe_link(receiver.endpoint, late, CLUSTER.transfer_ticket("d0", late), 1 << 20)


def test_transfer_model_overlaps_the_prefill():
    m = TransferModel(bytes_per_s=1e9, setup_s=0.01)
    b = 10**7  # 10 ms a block
    # the link keeps up with production: only the last step's blocks come after the prefill
    assert m.tail_s(100, b, produce_s=2.0, blocks_per_step=4) == pytest.approx(0.04)
    # the link is the bottleneck: the whole stream after the setup, less the prefill
    assert m.end_s(100, b, produce_s=0.2, blocks_per_step=4) == pytest.approx(1.01)
    assert m.tail_s(100, b, produce_s=0.2, blocks_per_step=4) == pytest.approx(0.81)
    assert m.end_s(0, b, 1.0, 4) == 0.0
    assert TransferModel.from_dict(m.to_dict()) == m
    assert TransferModel.measured(None).bytes_per_s > 0


def test_a_cancel_after_the_sender_has_gone_says_the_connection_was_lost():
    """The router cancels a transfer when its prefill fails, often because the prefill
    worker died: a connection its peer has closed (nothing left unread) ended the transfer
    first; an open one, or one with data still to read, did not."""
    import socket

    from kvgrid.transfer.receiver import _closed_by_peer

    a, b = socket.socketpair()
    assert not _closed_by_peer(a)
    b.sendall(b"x")
    b.close()
    assert not _closed_by_peer(a)  # a block still to read
    assert a.recv(1) == b"x"
    assert _closed_by_peer(a)
    a.close()
