"""Block keys: the one function that names a block of KV, end to end.

Engine, context store, router and KV events all call this module; nothing else hashes
tokens. A key chains its parent's key, the scope and the block's token ids:

    key_i = BLAKE2b-256(person="kvgrid-blk-v1"; frame(key_{i-1}) | frame(scope) | frame(tokens_i))

where frame(x) is a little-endian u32 length followed by the bytes, token ids are
little-endian u32, and the first block's parent is the empty string. The scope digest
folds in everything that changes the KV bytes: model fingerprint, dtype, KV layout
version and the tenant scope. Golden vectors in the tests pin this function: changing
it invalidates every stored object, so bump ``KEY_VERSION`` (and the person string).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_VERSION = 1
KEY_BYTES = 32
DEFAULT_BLOCK_SIZE = 64
# Bumped whenever the byte layout of a KV block changes (see kvgrid.engine.kv_cache).
KV_LAYOUT_VERSION = 1

_BLOCK_PERSON = b"kvgrid-blk-v1"
_SCOPE_PERSON = b"kvgrid-scope-v1"
_TENANT_PERSON = b"kvgrid-tenant-v1"
_BLOCK_HASHER = hashlib.blake2b(digest_size=KEY_BYTES, person=_BLOCK_PERSON)  # copied, never fed
_KEY_FRAME_PREFIX = struct.pack("<I", KEY_BYTES)  # frame() of a parent key, minus the key

# The tenant scope of requests that no authenticated tenant owns (local, single-user use),
# and of prefixes a deployment has configured to share across tenants.
PUBLIC_TENANT = b""


def _frame(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


def encode_tokens(tokens: Sequence[int]) -> bytes:
    """Canonical bytes of token ids: little-endian u32, independent of the host."""
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 0xFFFFFFFF):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4").tobytes()


def tenant_scope(server_secret: bytes, tenant_id: str) -> bytes:
    """The tenant part of a scope: HMAC of the server's secret, never client-supplied."""
    if not server_secret:
        raise ValueError("tenant_scope needs a non-empty server secret")
    return hmac.new(server_secret, _TENANT_PERSON + tenant_id.encode("utf-8"), "sha256").digest()


@dataclass(frozen=True)
class KVScope:
    """Everything that changes the bytes of a block's KV, besides its tokens."""

    model_fingerprint: str
    dtype: str
    layout_version: int = KV_LAYOUT_VERSION
    tenant: bytes = PUBLIC_TENANT

    def with_tenant(self, tenant: bytes) -> KVScope:
        return KVScope(self.model_fingerprint, self.dtype, self.layout_version, tenant)

    @property
    def digest(self) -> bytes:
        h = hashlib.blake2b(digest_size=KEY_BYTES, person=_SCOPE_PERSON)
        h.update(_frame(self.model_fingerprint.encode("utf-8")))
        h.update(_frame(self.dtype.encode("utf-8")))
        h.update(_frame(struct.pack("<I", self.layout_version)))
        h.update(_frame(self.tenant))
        return h.digest()


def block_key(parent: bytes | None, scope_digest: bytes, tokens: Sequence[int]) -> bytes:
    """Key of one block given its parent's key (None for the first block)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=_BLOCK_PERSON)
    h.update(_frame(parent or b""))
    h.update(_frame(scope_digest))
    h.update(_frame(encode_tokens(tokens)))
    return h.digest()


def block_keys(
    tokens: Sequence[int],
    scope: KVScope | bytes,
    block_size: int = DEFAULT_BLOCK_SIZE,
    parent: bytes | None = None,
    start_block: int = 0,
) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (a trailing partial block has no key).

    ``start_block`` with ``parent`` continues a chain: keys for blocks start_block.. of
    ``tokens``, where ``parent`` is the key of block start_block-1.
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    digest = scope.digest if isinstance(scope, KVScope) else scope
    end = len(tokens) // block_size
    if end <= start_block:
        return []
    # Encode all tokens once and hash slices: the same bytes block_key() would frame, at a
    # fraction of the cost (the router hashes every prompt on its hot path). Per block, one
    # update of the concatenated frames into a copy of a pre-personalised hasher: copying
    # is cheaper than setting up BLAKE2b's parameter block again.
    data = encode_tokens(tokens[start_block * block_size : end * block_size])
    width = 4 * block_size
    frames = _frame(digest) + struct.pack("<I", width)  # scope frame, token frame's length
    parent_frame = _frame(parent or b"")
    base = _BLOCK_HASHER.copy
    keys: list[bytes] = []
    for off in range(0, (end - start_block) * width, width):
        h = base()
        h.update(parent_frame + frames + data[off : off + width])
        key = h.digest()
        keys.append(key)
        parent_frame = _KEY_FRAME_PREFIX + key
    return keys


def block_keys_shared(
    tokens: Sequence[int],
    scope: KVScope | bytes,
    block_size: int,
    shared_tokens: int,
    shared_scope: KVScope | bytes,
    parent: bytes | None = None,
    start_block: int = 0,
) -> list[bytes]:
    """``block_keys`` of one chain whose leading blocks that lie wholly within the first
    ``shared_tokens`` tokens (a prefix configured as shared across tenants) are keyed in
    ``shared_scope``, the rest in ``scope``. Without shared tokens it is ``block_keys``."""
    shared_blocks = max(0, shared_tokens) // block_size
    out: list[bytes] = []
    if start_block < shared_blocks:
        end = min(shared_blocks, len(tokens) // block_size)
        out = block_keys(tokens[: end * block_size], shared_scope, block_size, parent, start_block)
        if out:
            parent, start_block = out[-1], start_block + len(out)
        if start_block < shared_blocks:
            return out  # the tokens end inside the shared prefix
    return out + block_keys(tokens, scope, block_size, parent, start_block)
