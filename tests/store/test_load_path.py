"""The load path below G2: objects are read into a reused per-thread buffer and decoded
straight into a G2 slot that readers see only once the object has verified."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.aead import decrypt_into, make_aead
from kvgrid.store.object import ObjectError, decode_object, encode_object, tenant_id
from tests.support.store_blocks import BLOCK_BYTES, KR, SCOPE, SHAPE, A, block


def chain(n: int) -> list[bytes]:
    return keys.block_keys(list(range(16 * n)), SCOPE.with_tenant(A), 16)


def store_with_g3(tmp_path, encrypt: bool, codec: str, g2_slots: int) -> ContextStore:
    cfg = StoreConfig(g2_bytes=g2_slots * BLOCK_BYTES, g3_dir=tmp_path / "g3", g3_bytes=1 << 24,
                      encrypt=encrypt, codec=codec, sweep_interval_s=0,
                      admit_after={"G2": 1, "G3": 1})  # fmt: skip
    return ContextStore(cfg, keyring=KR if encrypt else None)


@pytest.mark.parametrize("encrypt,codec", [(True, "none"), (False, "none"), (True, "zstd"),
                                           (False, "zstd")])  # fmt: skip
def test_a_damaged_object_never_reaches_g2(tmp_path, encrypt, codec):
    store = store_with_g3(tmp_path, encrypt, codec, g2_slots=4)
    ks = chain(3)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    store.g2.clear()
    path = store.tier("G3").path(tenant_id(A), ks[1])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # in the payload: the tag (or the CRC) fails after decoding began
    path.write_bytes(bytes(data))
    dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
    assert store.load_into(ks, A, dst) == ["G3"]  # stops at the damaged block
    assert torch.equal(dst[0], block(0))
    # the slot it was decoded into is gone, and free again (the load's read-ahead may
    # have promoted the block after it)
    assert store.g2.peek(tenant_id(A), ks[1]) is None
    end = time.monotonic() + 5  # a read-ahead fetch still running lets go when done
    while store.g2.pinned_count() and time.monotonic() < end:
        time.sleep(0.01)
    assert store.g2.pinned_count() == 0
    assert len(store.g2.free) == 4 - len(store.g2.entries)
    assert store.metrics.total("integrity_failures", tier="G3") == 1
    assert torch.equal(store.get(ks[2], A), block(2))
    store.close()


def test_blocks_fetched_on_one_thread_do_not_share_its_read_buffer(tmp_path):
    store = store_with_g3(tmp_path, False, "none", g2_slots=0)  # no G2: fresh tensors
    ks = chain(2)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    tid = tenant_id(A)
    first = store._fetch_lower(tid, ks[0], A)
    second = store._fetch_lower(tid, ks[1], A)
    assert torch.equal(first[2], block(0)) and torch.equal(second[2], block(1))
    store.close()


def test_decode_into_the_given_tensor_or_an_owned_one():
    k = chain(1)[0]
    for kr, codec in ((KR, "none"), (None, "none"), (KR, "zstd")):
        blob = encode_object(block(3), k, None, A, 16, kr, codec)
        dst = torch.zeros(SHAPE, dtype=torch.bfloat16)
        _, t = decode_object(blob, k, A, kr, out=lambda h, d=dst: d)
        assert t is dst and torch.equal(dst, block(3))
        buf = bytearray(blob)
        _, t = decode_object(buf, k, A, kr, out=lambda h: None)
        buf[:] = bytes(len(buf))  # the caller reuses its read buffer
        assert torch.equal(t, block(3))
    # a destination of another shape is refused before any byte is written
    blob = encode_object(block(3), k, None, A, 16, KR, "none")
    wrong = torch.zeros((2, *SHAPE), dtype=torch.bfloat16)
    with pytest.raises(ObjectError) as e:
        decode_object(blob, k, A, KR, out=lambda h: wrong)
    assert e.value.kind == "mismatch" and not wrong.any()


@pytest.mark.parametrize("backend", ["openssl", "cryptography"])
def test_decrypt_into_verifies_the_tag(backend):
    key, nonce = os.urandom(32), os.urandom(12)
    aead = make_aead(key, "auto") if backend == "openssl" else AESGCM(key)
    msg = os.urandom(4096)
    ct = AESGCM(key).encrypt(nonce, msg, b"header")
    out = np.zeros(len(msg), dtype=np.uint8)
    decrypt_into(aead, nonce, ct, b"header", memoryview(out))
    assert out.tobytes() == msg
    bad = bytearray(ct)
    bad[7] ^= 1
    with pytest.raises(InvalidTag):
        decrypt_into(aead, nonce, bytes(bad), b"header", memoryview(out))
    with pytest.raises(InvalidTag):
        decrypt_into(aead, nonce, ct, b"other header", memoryview(out))


@pytest.mark.parametrize("libzstd", [True, False])
def test_zstd_decodes_into_the_slot_with_or_without_libzstd(monkeypatch, libzstd):
    from kvgrid.store import codec as codecs

    if not libzstd:
        monkeypatch.setattr(codecs, "_libzstd", lambda: None)
    elif codecs._libzstd() is None:
        pytest.skip("no libzstd on this machine")
    t = torch.zeros(SHAPE, dtype=torch.bfloat16)
    t[0] = block(5)[0]  # compressible: zstd is kept
    cid, payload = codecs.encode(t, "zstd")
    assert cid == codecs.ZSTD
    out = torch.full(SHAPE, 7.0, dtype=torch.bfloat16)
    assert codecs.decode(cid, payload, t.nbytes, t.dtype, SHAPE, out) is out
    assert torch.equal(out, t)
    for bad in (bytes(payload)[:-8], b"\x28\xb5\x2f\xfd" + bytes(40)):
        with pytest.raises(codecs.CodecError):
            codecs.decode(cid, bad, t.nbytes, t.dtype, SHAPE, out)


def hinting_store(tmp_path, monkeypatch, n: int, workers: int):
    """A store whose G3 holds ``n`` blocks (G2 emptied), recording G3's readahead hints
    (on the hint thread: without fetch processes, whose readahead process takes the same
    hints instead, ``test_fetch_procs.py``)."""
    cfg = StoreConfig(g2_bytes=(n + 1) * BLOCK_BYTES, g3_dir=tmp_path / "g3", g3_bytes=1 << 26,
                      sweep_interval_s=0, admit_after={"G2": 1, "G3": 1},
                      load_workers=workers, fetch_procs=0)  # fmt: skip
    store = ContextStore(cfg)
    ks = chain(n)
    for i, k in enumerate(ks):
        store.put(k, None, A, block(i), 16)
    assert store.flush()
    g3 = store.tier("G3")
    hinted: list[list[bytes]] = []
    real = g3.will_need
    monkeypatch.setattr(
        g3, "will_need", lambda tid, batch: hinted.append(batch) or real(tid, batch)
    )
    store.g2.clear()
    return store, ks, hinted


def test_loads_below_g2_read_ahead_of_the_fetch_threads(tmp_path, monkeypatch):
    """A load tells G3 about the blocks beyond those the fetch threads hold, once each and
    in order (the disk then reads while the threads decode); the data is unchanged."""
    store, ks, hinted = hinting_store(tmp_path, monkeypatch, 7, workers=1)
    assert torch.equal(store.get(ks[0], A), block(0))  # promoted to G2: not hinted
    dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
    assert store.load_into(ks, A, dst) == ["G2"] + ["G3"] * 6
    store._hints.submit(lambda: None).result()  # the hint thread has run everything queued
    assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
    assert [k for b in hinted for k in b] == ks[1:]
    assert len(hinted[0]) == 2 * store._window  # the fetch window, and one window beyond
    # a load about to start (waiting for the engine's launch): the disk starts on its
    # first window of blocks below G2 at once
    hinted.clear()
    store.g2.clear()
    assert torch.equal(store.get(ks[0], A), block(0))
    store.will_load(ks, A)
    store._hints.submit(lambda: None).result()
    assert hinted == [ks[1 : 1 + store._window]]
    store.close()


def test_readahead_hints_gather_blocks_instead_of_waking_the_hint_thread_per_block(
    tmp_path, monkeypatch
):
    """With a window of 16 blocks (8 fetch threads) a long load hints its first two windows
    at once, then its blocks 4 at a time (not one by one), in order, each once."""
    store, ks, hinted = hinting_store(tmp_path, monkeypatch, 40, workers=8)
    dst = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in ks]
    assert store.load_into(ks, A, dst) == ["G3"] * 40
    store._hints.submit(lambda: None).result()
    assert all(torch.equal(d, block(i)) for i, d in enumerate(dst))
    assert [k for b in hinted for k in b] == ks
    assert len(hinted[0]) == 2 * store._window
    assert all(len(b) >= 4 for b in hinted[1:-1]) and len(hinted) <= 8
    store.close()


def test_disk_readahead_hint_skips_absent_objects(tmp_path, monkeypatch):
    store = store_with_g3(tmp_path, False, "none", g2_slots=0)
    ks = chain(2)
    store.put(ks[0], None, A, block(0), 16)
    assert store.flush()
    advised = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, how: advised.append(how))
    store.tier("G3").will_need(tenant_id(A), ks)  # ks[1] was never stored
    assert advised == [os.POSIX_FADV_WILLNEED]
    store.close()
