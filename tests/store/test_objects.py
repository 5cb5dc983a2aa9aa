"""Stored objects: format round trip, integrity (flip, swap, wrong tenant key), keys, codecs."""

from __future__ import annotations

import os
import shutil
import stat
import zlib

import pytest
import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store import codec as codecs
from kvgrid.store.crypto import KeyRing, MasterKeyError, load_keyring, rotate_key_file
from kvgrid.store.object import ObjectError, decode_object, encode_object, read_header, tenant_id

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
B = keys.tenant_scope(b"server-secret", "tenant-b")
SHAPE = (2, 2, 16, 2, 8)  # layers, K/V, block size, kv heads, head dim


def block(seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g).to(dtype)


def chain(tenant: bytes, n: int, start: int = 0) -> list[bytes]:
    toks = list(range(start, start + 16 * n))
    return keys.block_keys(toks, SCOPE.with_tenant(tenant), 16)


def ring() -> KeyRing:
    return KeyRing({1: os.urandom(32)})


def g3_store(tmp_path, keyring, **kw) -> ContextStore:
    cfg = StoreConfig(g2_bytes=0, g3_dir=tmp_path / "g3", g3_bytes=16 << 20,
                      admit_after={"G3": 1}, sweep_interval_s=0, **kw)  # fmt: skip
    return ContextStore(cfg, keyring=keyring)


def test_object_round_trip_is_exact_and_self_describing():
    kr = ring()
    t = block(0)
    k = chain(A, 2)
    blob = encode_object(t, k[1], k[0], A, 16, kr, model_fingerprint="fp")
    h = read_header(blob)
    assert (h.key, h.parent_key, h.tenant_id, h.token_count) == (k[1], k[0], tenant_id(A), 16)
    assert (h.dtype, h.shape, h.model_fingerprint, h.key_id) == ("bfloat16", SHAPE, "fp", 1)
    assert h.object_len == len(blob) and h.raw_len == t.nbytes
    h2, out = decode_object(blob, k[1], A, kr, torch.bfloat16, SHAPE, "fp")
    assert torch.equal(out, t) and h2 == h
    # the payload is encrypted: the raw block bytes do not appear in the object
    raw = bytes(codecs.as_bytes(t))
    assert raw[:64] not in blob
    with pytest.raises(ObjectError) as e:
        decode_object(blob, k[1], A, kr, model_fingerprint="other-model")
    assert e.value.kind == "mismatch"


def _put_sync(store: ContextStore, key, tenant, t, parent=None):
    store.put(key, parent, tenant, t, 16)
    assert store.flush()


def test_flipped_byte_is_a_counted_miss(tmp_path):
    kr = ring()
    store = g3_store(tmp_path, kr)
    ks = chain(A, 3)
    for i, k in enumerate(ks):
        _put_sync(store, k, A, block(i))
    g3 = store.tier("G3")
    for flip_at in (10, -5):  # one byte in the header, one in the payload
        k = ks[0] if flip_at > 0 else ks[1]
        path = g3.path(tenant_id(A), k)
        data = bytearray(path.read_bytes())
        data[flip_at] ^= 0x01
        path.write_bytes(bytes(data))
    before = store.metrics.total("integrity_failures", tier="G3")
    assert store.get(ks[0], A) is None
    assert store.get(ks[1], A) is None
    assert store.metrics.total("integrity_failures", tier="G3") == before + 2
    assert store.metrics.total("misses", tier="G3", reason="checksum") == 2
    assert torch.equal(store.get(ks[2], A), block(2))  # the untouched object still hits
    # damaged objects are removed, never served later
    assert store.contains(ks, A) == [None, None, None]
    assert store.metrics.total("evictions", tier="G3", reason="corrupt") == 2
    store.close()


def test_swapped_objects_are_counted_misses(tmp_path):
    store = g3_store(tmp_path, ring())
    ks = chain(A, 2)
    for i, k in enumerate(ks):
        _put_sync(store, k, A, block(i))
    g3 = store.tier("G3")
    p0, p1 = g3.path(tenant_id(A), ks[0]), g3.path(tenant_id(A), ks[1])
    tmp = p0.with_suffix(".x")
    os.rename(p0, tmp)
    os.rename(p1, p0)
    os.rename(tmp, p1)
    assert store.get(ks[0], A) is None and store.get(ks[1], A) is None
    assert store.metrics.total("misses", tier="G3", reason="mismatch") == 2
    assert store.metrics.total("integrity_failures", tier="G3", kind="mismatch") == 2
    store.close()


def test_wrong_tenant_key_is_a_counted_miss(tmp_path):
    """An object of tenant A, placed under tenant B's name with its header rewritten to
    claim B (checksum recomputed, so only the cryptography can tell): a decrypt miss."""
    kr = ring()
    store = g3_store(tmp_path, kr)
    ka = chain(A, 1)[0]
    _put_sync(store, ka, A, block(0))
    g3 = store.tier("G3")
    blob = bytearray(g3.path(tenant_id(A), ka).read_bytes())
    h = read_header(bytes(blob))
    off = blob.index(tenant_id(A))
    blob[off : off + 16] = tenant_id(B)
    body = bytes(blob[h.header_len + 4 :])
    crc = zlib.crc32(body, zlib.crc32(bytes(blob[: h.header_len])))
    blob[h.header_len : h.header_len + 4] = crc.to_bytes(4, "little")
    forged = g3.path(tenant_id(B), ka)
    forged.parent.mkdir(parents=True, exist_ok=True)
    forged.write_bytes(bytes(blob))
    assert store.get(ka, B) is None
    assert store.metrics.total("misses", tier="G3", reason="decrypt") == 1
    assert store.metrics.total("integrity_failures", tier="G3", kind="decrypt") == 1
    assert torch.equal(store.get(ka, A), block(0))  # the real owner still hits
    # and directly: B's key cannot open A's object even with A's header intact
    with pytest.raises(ObjectError) as e:
        decode_object(bytes(blob), ka, B, kr)
    assert e.value.kind == "decrypt"
    store.close()


def test_key_rotation_old_objects_still_decrypt(tmp_path, monkeypatch):
    monkeypatch.delenv("KVGRID_MASTER_KEY", raising=False)
    keyfile = tmp_path / "keys"
    kr1 = load_keyring(default_dir=tmp_path)  # generates <dir>/master.key
    shutil.copy(tmp_path / "master.key", keyfile)
    os.chmod(keyfile, 0o600)
    k = chain(A, 2)
    old = encode_object(block(0), k[0], None, A, 16, kr1)
    assert rotate_key_file(keyfile) == 2
    kr2 = load_keyring(keyfile)
    assert kr2.current_id == 2
    new = encode_object(block(1), k[1], k[0], A, 16, kr2)
    assert read_header(new).key_id == 2 and read_header(old).key_id == 1
    assert torch.equal(decode_object(old, k[0], A, kr2)[1], block(0))
    assert torch.equal(decode_object(new, k[1], A, kr2)[1], block(1))
    with pytest.raises(ObjectError) as e:  # a ring that lost key 2 cannot open new objects
        decode_object(new, k[1], A, kr1)
    assert e.value.kind == "decrypt"
    with pytest.raises(ObjectError) as e:  # and plaintext objects are refused (no downgrade)
        decode_object(encode_object(block(2), k[0], None, A, 16, None), k[0], A, kr2)
    assert e.value.kind == "decrypt"


def test_master_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("KVGRID_MASTER_KEY", raising=False)
    monkeypatch.delenv("KVGRID_STORE_DIR", raising=False)  # conftest points it elsewhere
    monkeypatch.setenv("KVGRID_HOME", str(tmp_path / "home"))
    kr = load_keyring()
    path = tmp_path / "home" / "store" / "master.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_keyring().masters == kr.masters  # generated once, then reused
    os.chmod(path, 0o644)
    with pytest.raises(MasterKeyError, match="readable by others"):
        load_keyring()
    monkeypatch.setenv("KVGRID_MASTER_KEY", "3:" + "ab" * 32 + ",7:" + "cd" * 32)
    env = load_keyring()
    assert env.current_id == 7 and set(env.masters) == {3, 7}
    monkeypatch.setenv("KVGRID_MASTER_KEY", "abcd")
    with pytest.raises(MasterKeyError, match="32"):
        load_keyring()


def test_lossless_default_and_lossy_codec_behind_accuracy_check():
    kr = ring()
    k = chain(A, 1)[0]
    smooth = block(3, torch.float32)
    # default codec is lossless: bit exact
    _, out = decode_object(encode_object(smooth, k, None, A, 16, kr), k, A, kr)
    assert torch.equal(out, smooth)
    # int8 passes the check on well-behaved data: stored lossy, within the bound
    bound = 0.006
    blob = encode_object(smooth, k, None, A, 16, kr, codec="int8", max_rel_error=bound)
    assert read_header(blob).codec == codecs.INT8
    _, q = decode_object(blob, k, A, kr)
    rel = (q - smooth).norm() / smooth.norm()
    assert 0 < rel < bound
    # an 8-sigma outlier per channel makes int8 too coarse for the same bound: the check
    # fails and the block is stored lossless instead
    spiky = smooth.clone()
    spiky[..., 0, :, :] = 8.0
    blob = encode_object(spiky, k, None, A, 16, kr, codec="int8", max_rel_error=bound)
    assert read_header(blob).codec != codecs.INT8
    assert torch.equal(decode_object(blob, k, A, kr)[1], spiky)


def test_truncated_object_is_a_header_or_checksum_error():
    kr = ring()
    k = chain(A, 1)[0]
    blob = encode_object(block(0), k, None, A, 16, kr)
    for cut in (3, 40, len(blob) - 1):
        with pytest.raises(ObjectError) as e:
            decode_object(blob[:cut], k, A, kr)
        assert e.value.kind in ("header", "checksum")


def test_incompressible_blocks_are_stored_raw_and_compressible_ones_packed():
    g = torch.Generator().manual_seed(1)
    noise = torch.randint(-(2**15), 2**15, (8, 2, 64, 8, 128), generator=g, dtype=torch.int16)
    cid, payload = codecs.encode(noise.view(torch.bfloat16), "zstd")
    assert cid == codecs.NONE and len(payload) == noise.nbytes  # not worth decompressing
    smooth = torch.linspace(0, 1, noise.numel()).reshape(noise.shape).to(torch.bfloat16)
    cid, payload = codecs.encode(smooth, "zstd")
    assert cid == codecs.ZSTD and len(payload) < 0.5 * smooth.nbytes
    back = codecs.decode(cid, payload, smooth.nbytes, torch.bfloat16, tuple(smooth.shape))
    assert torch.equal(back, smooth)


def test_bf16_kv_that_shrinks_a_little_is_compressed_only_where_that_pays(tmp_path):
    """Random-weight bf16 KV shrinks by about a fifth at ~0.5 GB/s: compressing it saves
    ~0.1 GB/s of writing, less than a disk writes (stored raw), more than a slow link (kept
    compressed). Either way the object says its codec and reads back bit for bit."""
    g = torch.Generator().manual_seed(2)
    kv = torch.randn((5, 2, 64, 8, 128), generator=g).to(torch.bfloat16)  # 1.25 MiB
    kr = KeyRing({1: os.urandom(32)})
    key = keys.block_keys(list(range(64)), b"scope", 64)[0]
    for rate, want in ((1e12, codecs.NONE), (1e3, codecs.ZSTD), (None, codecs.ZSTD)):
        blob = encode_object(kv, key, None, b"t", 64, kr, "zstd", write_bytes_per_s=rate)
        h = read_header(blob)
        assert h.codec == want, rate
        assert (h.payload_len < 0.9 * kv.nbytes) == (want == codecs.ZSTD)
        _, back = decode_object(blob, key, b"t", kr, torch.bfloat16, tuple(kv.shape))
        assert torch.equal(back, kv)
    # the store's writers measure their disk and pass it on: a fast disk gets raw objects
    cfg = StoreConfig(g2_bytes=4 * kv.nbytes, g3_dir=tmp_path / "g3", sweep_interval_s=0,
                      probe_tiers=False)  # fmt: skip
    for rate, want in ((1e12, codecs.NONE), (1e3, codecs.ZSTD)):
        store = ContextStore(cfg, keyring=kr)
        store.writes.write_rate["G3"] = rate
        k = keys.block_keys(list(range(64)), os.urandom(8), 64)[0]
        assert store.put_blocks([k], [None], keys.PUBLIC_TENANT, [kv], 64) == ["g2"]
        assert store.flush(30)
        path = store.tier("G3").path(tenant_id(keys.PUBLIC_TENANT), k)
        assert read_header(path.read_bytes()).codec == want
        store.g2.clear()
        assert torch.equal(store.get(k, keys.PUBLIC_TENANT), kv)
        store.close()
