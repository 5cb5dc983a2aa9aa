"""The control-plane credential (kvgrid.server.auth): derivation, tokens, files, CURVE."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from kvgrid.events import BlockStored, EventBatch
from kvgrid.router import wire
from kvgrid.server.auth import (
    ControlKey,
    CredentialError,
    check_admin,
    is_loopback_host,
    load_control_key,
)
from kvgrid.server.publisher import EventPublisher


def test_worker_keys_bind_a_worker_id():
    cluster = ControlKey.generate()
    w1 = cluster.for_worker("w1")
    assert ControlKey.loads(cluster.dumps()) == cluster
    assert ControlKey.loads(w1.dumps()) == w1 and w1.worker_id == "w1"
    assert cluster.key.hex() not in repr(cluster)  # never in logs or tracebacks
    # the router (cluster key) and the worker (its own key) compute the same tokens
    assert cluster.router_token("w1") == w1.router_token("w1")
    assert w1.check_router_token("w1", f"Bearer {cluster.router_token('w1')}")
    assert cluster.check_worker_token(f"Bearer {w1.worker_token('w1')}") == "w1"
    # a worker key speaks for its worker only
    with pytest.raises(CredentialError, match="belongs to worker 'w1'"):
        w1.worker_token("w2")
    forged = w1.worker_token("w1").replace(".w1.", ".w2.")
    assert cluster.check_worker_token(f"Bearer {forged}") is None
    # another cluster's keys, garbage and missing headers are all refused
    other = ControlKey.generate()
    assert not w1.check_router_token("w1", f"Bearer {other.router_token('w1')}")
    assert cluster.check_worker_token(f"Bearer {other.worker_token('w1')}") is None
    for bad in (None, "", "Bearer", "Basic abc", "Bearer kvw1..", "Bearer kvw1.w1.zz"):
        assert cluster.check_worker_token(bad) is None
        assert not w1.check_router_token("w1", bad)
    # the /info proof answers this nonce, for this worker, and nothing else
    proof = w1.info_proof("w1", "n1")
    assert cluster.check_info_proof("w1", "n1", proof)
    assert not cluster.check_info_proof("w1", "n2", proof)
    assert not cluster.check_info_proof("w2", "n1", proof)
    assert not other.check_info_proof("w1", "n1", proof)


def test_key_files_and_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("KVGRID_CONTROL_KEY", raising=False)
    monkeypatch.delenv("KVGRID_CONTROL_KEY_FILE", raising=False)
    assert load_control_key() is None
    key = ControlKey.generate()
    f = tmp_path / "cluster.key"
    f.write_text(key.dumps() + "\n")
    f.chmod(0o644)
    with pytest.raises(CredentialError, match="chmod 600"):
        load_control_key(f)
    f.chmod(0o600)
    assert load_control_key(f) == key
    monkeypatch.setenv("KVGRID_CONTROL_KEY_FILE", str(f))
    assert load_control_key() == key
    monkeypatch.delenv("KVGRID_CONTROL_KEY_FILE")
    monkeypatch.setenv("KVGRID_CONTROL_KEY", key.for_worker("w3").dumps())
    assert load_control_key() == key.for_worker("w3")
    monkeypatch.setenv("KVGRID_CONTROL_KEY", "kvgrid-cluster-v1:abcd")
    with pytest.raises(CredentialError, match="32 bytes"):
        load_control_key()
    monkeypatch.setenv("KVGRID_CONTROL_KEY", "hunter2")
    with pytest.raises(CredentialError, match="kvgrid-cluster-v1"):
        load_control_key()


def test_admin_token_and_loopback(monkeypatch):
    monkeypatch.delenv("KVGRID_ADMIN_TOKEN", raising=False)
    assert not check_admin("Bearer anything")  # no token configured: nobody is admin by token
    monkeypatch.setenv("KVGRID_ADMIN_TOKEN", "s3cret")
    assert (
        check_admin("Bearer s3cret") and not check_admin("Bearer s3cre") and not check_admin(None)
    )
    assert (
        is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("localhost")
    )
    assert not is_loopback_host("0.0.0.0") and not is_loopback_host("10.1.2.3")


def test_master_key_creation_is_safe_when_workers_start_together(tmp_path, monkeypatch):
    """Workers of one machine create the store's master key on first start, all at once:
    every one of them must end up with the same, whole key (the file system race is the same
    between threads as between processes)."""
    from kvgrid.store.crypto import load_keyring

    monkeypatch.delenv("KVGRID_MASTER_KEY", raising=False)
    for round_ in range(20):
        d = tmp_path / f"r{round_}"
        n = 8
        barrier, got = threading.Barrier(n), []

        def start(barrier=barrier, got=got, d=d) -> None:
            barrier.wait()
            try:
                got.append(load_keyring(None, default_dir=d).masters[1].hex())
            except Exception as e:  # a reader that found the file made but still empty
                got.append(f"error: {e!r}")

        threads = [threading.Thread(target=start) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(got) == n and len(set(got)) == 1 and not got[0].startswith("error"), got
        assert oct((d / "master.key").stat().st_mode & 0o777) == "0o600"
        assert not [x for x in os.listdir(d) if x.endswith(".tmp")]


def _monitor_events(sock: zmq.Socket):
    mon = sock.get_monitor_socket(
        zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    )  # fmt: skip
    return mon


def _wait_event(mon, timeout_s: float = 5.0) -> dict | None:
    from zmq.utils.monitor import recv_monitor_message

    if mon.poll(int(timeout_s * 1000)):
        return recv_monitor_message(mon)
    return None


def test_event_stream_is_curve_encrypted_and_admits_only_the_router():
    cluster = ControlKey.generate()
    pub = EventPublisher("127.0.0.1", 0, "ep", cluster.for_worker("w1"), "w1")
    ctx = zmq.Context()
    try:
        endpoint = f"tcp://127.0.0.1:{pub.port}"
        router = ctx.socket(zmq.SUB)
        router.setsockopt(zmq.SUBSCRIBE, b"")
        cluster.secure_subscriber(router, "w1")
        mon_ok = _monitor_events(router)
        router.connect(endpoint)
        # an outsider that knows the worker's public key but not the key the router derives
        outsider = ctx.socket(zmq.SUB)
        outsider.setsockopt(zmq.SUBSCRIBE, b"")
        outsider.curve_serverkey = cluster.curve_server("w1")[0]
        outsider.curve_publickey, outsider.curve_secretkey = zmq.curve_keypair()
        mon_bad = _monitor_events(outsider)
        outsider.connect(endpoint)
        plain = ctx.socket(zmq.SUB)  # no CURVE at all
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        mon_plain = _monitor_events(plain)
        plain.connect(endpoint)
        assert _wait_event(mon_ok)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        bad = _wait_event(mon_bad)
        assert bad["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and bad["value"] == 400, bad
        assert _wait_event(mon_plain)["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not router.poll(50):
            pub.publish_events(
                EventBatch("w1", 1, 0.0, [BlockStored((b"k" * 32,), None, "G1", 64)])
            )
        topic, payload = router.recv_multipart()
        batch, epoch = wire.decode_batch(payload)
        assert topic == wire.TOPIC_KV and batch.worker_id == "w1" and epoch == "ep"
        assert not outsider.poll(300) and not plain.poll(100)
        assert pub.auth.denied >= 1
    finally:
        ctx.destroy(0)
        pub.close()
