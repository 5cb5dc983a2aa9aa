"""The stored-object format: one block (all layers) per object, self-describing.

    header  (all of it is the AES-GCM associated data)
      magic "KVGO", format version, header length, flags, codec, layout version,
      key id, token count, created time, payload length, raw length, block key,
      parent key, tenant id, nonce, dtype, shape, model fingerprint
    checksum  CRC-32 of header + payload (catches torn or flipped bytes even without
              the key, for audits; AES-GCM's tag is what stops tampering, so a load of an
              encrypted object trusts the tag and reads the CRC only to name a failure)
    payload   codec(block bytes), then AES-256-GCM under the tenant's key

Because the header (block key and tenant id included) is authenticated, an object copied
under another key's name, or read with another tenant's key, fails to decrypt; the reader
also checks the header's key and tenant against what it asked for. Every failure is an
``ObjectError`` with a ``kind`` (header, checksum, decrypt, mismatch, codec) that the
store turns into a counted miss.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cryptography.exceptions import InvalidTag

from kvgrid.store import codec as codecs
from kvgrid.store.aead import TAG_BYTES, decrypt_into, encrypt_into
from kvgrid.store.crypto import KeyRing

MAGIC = b"KVGO"
FORMAT_VERSION = 1
_FIXED = struct.Struct("<4sHHHBBHIIdQQ32s32s16s12s")
_F_ENCRYPTED = 1
_F_PARENT = 2
_CRC = struct.Struct("<I")
MAX_HEADER = 4096  # enough to read a header without knowing its length


def max_object_len(raw_len: int) -> int:
    """The most bytes an object of a ``raw_len``-byte block can take (a codec is used only
    where it shrinks the block)."""
    return MAX_HEADER + _CRC.size + raw_len + TAG_BYTES


class ObjectError(Exception):
    def __init__(self, kind: str, msg: str) -> None:
        super().__init__(f"{kind}: {msg}")
        self.kind = kind


def tenant_id(tenant: bytes) -> bytes:
    """A short, fixed-size name for a tenant scope (16 bytes), used in paths and headers."""
    return hashlib.blake2b(tenant, digest_size=16, person=b"kvgrid-tid-v1").digest()


# the store names the tenant of every call it serves, and a server sees few tenants
cached_tenant_id = functools.lru_cache(maxsize=4096)(tenant_id)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ObjectError("header", f"unknown dtype {name!r}")
    return dt


@dataclass(frozen=True)
class ObjectHeader:
    key: bytes
    parent_key: bytes | None
    tenant_id: bytes
    model_fingerprint: str
    layout_version: int
    dtype: str
    shape: tuple[int, ...]
    codec: int
    key_id: int  # 0: not encrypted
    token_count: int
    created: float
    payload_len: int
    raw_len: int
    nonce: bytes
    header_len: int

    @property
    def encrypted(self) -> bool:
        return self.key_id != 0

    @property
    def object_len(self) -> int:
        return self.header_len + _CRC.size + self.payload_len


def _pack_header(h: ObjectHeader) -> bytes:
    dt = h.dtype.encode()
    fp = h.model_fingerprint.encode()
    tail = (
        struct.pack("<B", len(dt))
        + dt
        + struct.pack("<B", len(h.shape))
        + struct.pack(f"<{len(h.shape)}I", *h.shape)
        + struct.pack("<H", len(fp))
        + fp
    )
    flags = (_F_ENCRYPTED if h.encrypted else 0) | (_F_PARENT if h.parent_key else 0)
    fixed = _FIXED.pack(
        MAGIC,
        FORMAT_VERSION,
        _FIXED.size + len(tail),
        flags,
        h.codec,
        0,
        h.layout_version,
        h.key_id,
        h.token_count,
        h.created,
        h.payload_len,
        h.raw_len,
        h.key,
        h.parent_key or bytes(32),
        h.tenant_id,
        h.nonce,
    )
    return fixed + tail


def read_header(buf: bytes | memoryview) -> ObjectHeader:
    """Parse a header from the start of ``buf``; raises ObjectError("header")."""
    try:
        (magic, version, hlen, flags, codec, _, layout, key_id, ntok, created, plen, rlen,
         key, parent, tid, nonce) = _FIXED.unpack_from(buf, 0)  # fmt: skip
        if magic != MAGIC:
            raise ObjectError("header", "bad magic")
        if version != FORMAT_VERSION:
            raise ObjectError("header", f"format version {version} is not {FORMAT_VERSION}")
        off = _FIXED.size
        (n,) = struct.unpack_from("<B", buf, off)
        dt = bytes(buf[off + 1 : off + 1 + n]).decode()
        off += 1 + n
        (nd,) = struct.unpack_from("<B", buf, off)
        shape = struct.unpack_from(f"<{nd}I", buf, off + 1)
        off += 1 + 4 * nd
        (n,) = struct.unpack_from("<H", buf, off)
        fp = bytes(buf[off + 2 : off + 2 + n]).decode()
        off += 2 + n
    except (struct.error, UnicodeDecodeError) as e:
        raise ObjectError("header", f"truncated or malformed header: {e}") from None
    if off != hlen or bool(flags & _F_ENCRYPTED) != (key_id != 0):
        raise ObjectError("header", "inconsistent header")
    return ObjectHeader(
        key=key,
        parent_key=parent if flags & _F_PARENT else None,
        tenant_id=tid,
        model_fingerprint=fp,
        layout_version=layout,
        dtype=dt,
        shape=tuple(shape),
        codec=codec,
        key_id=key_id,
        token_count=ntok,
        created=created,
        payload_len=plen,
        raw_len=rlen,
        nonce=nonce,
        header_len=hlen,
    )


def encode_object(
    block: torch.Tensor,
    key: bytes,
    parent_key: bytes | None,
    tenant: bytes,
    token_count: int,
    keyring: KeyRing | None,
    codec: str = "zstd",
    level: int = 1,
    max_rel_error: float = 0.01,
    model_fingerprint: str = "",
    layout_version: int = 1,
    created: float | None = None,
    out: bytearray | memoryview | None = None,
    write_bytes_per_s: float | None = None,
) -> bytes | memoryview:
    """Serialise one block (a contiguous CPU tensor). ``keyring=None`` stores it unencrypted.
    With ``out`` (a writable buffer of at least ``max_object_len`` bytes) the object is
    written there and a view of it returned: a sender reusing its buffers spares the page
    faults of a fresh buffer per object, which cost more than encrypting it.
    ``write_bytes_per_s``: the destination's write bandwidth, where known (``codec.pays``)."""
    cid, payload = codecs.encode(block, codec, level, max_rel_error, write_bytes_per_s)
    key_id = keyring.current_id if keyring is not None else 0
    nonce = os.urandom(12) if keyring is not None else bytes(12)
    plen = len(payload) + (16 if keyring is not None else 0)  # GCM tag
    h = ObjectHeader(
        key=key,
        parent_key=parent_key,
        tenant_id=tenant_id(tenant),
        model_fingerprint=model_fingerprint,
        layout_version=layout_version,
        dtype=dtype_name(block.dtype),
        shape=tuple(block.shape),
        codec=cid,
        key_id=key_id,
        token_count=token_count,
        created=time.time() if created is None else created,
        payload_len=plen,
        raw_len=block.nbytes,
        nonce=nonce,
        header_len=0,
    )
    header = _pack_header(h)
    if out is not None:
        return _encode_into(out, header, payload, plen, nonce, keyring, key_id, tenant)
    if keyring is not None:
        payload = keyring.aead(key_id, tenant).encrypt(nonce, payload, header)
    crc = zlib.crc32(payload, zlib.crc32(header))
    return b"".join((header, _CRC.pack(crc), payload))


def _encode_into(out, header: bytes, payload, plen: int, nonce, keyring, key_id, tenant):
    view = memoryview(out).cast("B")
    start = len(header) + _CRC.size
    total = start + plen
    if len(view) < total:
        raise ValueError(f"output buffer holds {len(view)} bytes; the object needs {total}")
    view[: len(header)] = header
    body = view[start:total]
    if keyring is not None:
        encrypt_into(keyring.aead(key_id, tenant), nonce, payload, header, body)
    else:
        body[:] = payload
    _CRC.pack_into(view, len(header), zlib.crc32(body, zlib.crc32(header)))
    return view[:total]


def check_object(blob: bytes | memoryview) -> ObjectHeader:
    """Header and checksum of an object, without the key (for audits of other tenants)."""
    h = _header_and_length(blob)
    if not _crc_ok(blob, h):
        raise ObjectError("checksum", "checksum mismatch")
    return h


def _header_and_length(blob: bytes | memoryview) -> ObjectHeader:
    h = read_header(blob)
    if len(blob) != h.object_len:
        raise ObjectError("checksum", f"object is {len(blob)} bytes, header says {h.object_len}")
    return h


def _crc_ok(blob: bytes | memoryview, h: ObjectHeader) -> bool:
    (crc,) = _CRC.unpack_from(blob, h.header_len)
    view = memoryview(blob)
    return zlib.crc32(view[h.header_len + _CRC.size :], zlib.crc32(view[: h.header_len])) == crc


def decode_object(
    blob: bytes | memoryview,
    key: bytes,
    tenant: bytes,
    keyring: KeyRing | None,
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
    model_fingerprint: str | None = None,
    out: Callable[[ObjectHeader], torch.Tensor | None] | None = None,
) -> tuple[ObjectHeader, torch.Tensor]:
    """Verify and open an object read back for (key, tenant); the block as a CPU tensor.

    Raises ObjectError on any mismatch: never returns data that is not exactly what was
    stored under this key for this tenant (lossy codecs aside).

    ``out(header)``, called once the header has passed its checks, gives the tensor to
    decode into (a G2 slot that no reader sees yet), or None for a new one: the block then
    never aliases ``blob`` (which may be a reused read buffer), and an uncompressed payload
    is written once, straight into place (decrypted there, or copied there after its CRC).
    After an ObjectError that tensor holds unverified bytes: the caller must discard it.
    """
    h = _header_and_length(blob)
    if not h.encrypted and not _crc_ok(blob, h):
        raise ObjectError("checksum", "checksum mismatch")
    dst = None
    try:
        _check_identity(h, key, tenant, dtype, shape, model_fingerprint)
        if out is not None:
            dst = destination(h, out)
        if dst is not None and h.encrypted and h.codec == codecs.NONE:
            # the tag is checked as the last byte is decrypted: nothing is read before that
            _decrypt(blob, h, tenant, keyring, codecs.as_bytes(dst))
            return h, dst
        payload = _decrypt(blob, h, tenant, keyring)
    except ObjectError:
        # An encrypted object skipped the CRC pass: its GCM tag covers header and payload,
        # so the CRC would only cost a second read of every byte. On a failure it tells a
        # damaged object (removed by the store) from a foreign or misplaced one.
        if h.encrypted and not _crc_ok(blob, h):
            raise ObjectError("checksum", "checksum mismatch") from None
        raise
    try:
        t = codecs.decode(h.codec, payload, h.raw_len, dtype_of(h.dtype), h.shape, dst)
    except codecs.CodecError as e:
        raise ObjectError("codec", str(e)) from None
    return h, t


def destination(h: ObjectHeader, out: Callable) -> torch.Tensor:
    """The tensor a block ``h`` describes is decoded into: ``out(h)``, or a new one where
    that gives None; an ``out`` of another shape or type is an ObjectError."""
    dt = dtype_of(h.dtype)
    dst = out(h)
    if dst is None:
        dst = torch.empty(h.shape, dtype=dt)
    n = int(torch.Size(h.shape).numel()) * dst.element_size()
    if tuple(dst.shape) != h.shape or dst.dtype != dt or not dst.is_contiguous():
        raise ObjectError("mismatch", f"object is {h.dtype}{list(h.shape)}, output is not")
    if h.raw_len != n:
        raise ObjectError("header", f"raw length {h.raw_len} is not {n} bytes")
    return dst


def _payload(blob: bytes | memoryview, h: ObjectHeader) -> memoryview:
    return memoryview(blob)[h.header_len + _CRC.size :]


def _check_identity(
    h: ObjectHeader,
    key: bytes,
    tenant: bytes,
    dtype: torch.dtype | None,
    shape: tuple[int, ...] | None,
    model_fingerprint: str | None,
) -> None:
    if h.key != key or h.tenant_id != tenant_id(tenant):
        raise ObjectError("mismatch", "object belongs to another block or tenant")
    if model_fingerprint and h.model_fingerprint != model_fingerprint:
        raise ObjectError("mismatch", "object was written for another model")
    want = None if dtype is None else dtype_name(dtype)
    if (want is not None and h.dtype != want) or (shape is not None and h.shape != tuple(shape)):
        raise ObjectError("mismatch", f"object is {h.dtype}{list(h.shape)}, wanted {want}{shape}")


def _decrypt(
    blob: bytes | memoryview, h: ObjectHeader, tenant: bytes, keyring: KeyRing | None, into=None
):
    """The authenticated plaintext payload (into ``into`` if given). With a key ring loaded,
    plaintext objects are refused: whoever can write the store must not be able to
    downgrade an object to one without authentication."""
    if not h.encrypted:
        if keyring is not None:
            raise ObjectError("decrypt", "unencrypted object where encryption is required")
        return _payload(blob, h)
    if keyring is None:
        raise ObjectError("decrypt", "object is encrypted and no key ring is loaded")
    aead = keyring.aead(h.key_id, tenant)
    if aead is None:
        raise ObjectError("decrypt", f"master key id {h.key_id} is not in the key ring")
    header = memoryview(blob)[: h.header_len]
    try:
        if into is None:
            return aead.decrypt(h.nonce, _payload(blob, h), header)
        if h.payload_len - TAG_BYTES != len(into):
            raise ObjectError("header", "encrypted payload length does not match the block")
        decrypt_into(aead, h.nonce, _payload(blob, h), header, into)
        return into
    except InvalidTag:
        raise ObjectError("decrypt", "authentication failed") from None
