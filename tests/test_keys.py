"""Golden vectors for kvgrid.keys: changing the key function invalidates every stored
object and every router index, so these values are pinned (computed once, never edited
unless KEY_VERSION is bumped)."""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys

import pytest

from kvgrid import keys

SCOPE = keys.KVScope("llama3-8b@abc", "bfloat16")
ACME = keys.tenant_scope(b"secret", "acme")

GOLDEN_SCOPE_DIGEST = "656a81c693df13a90181e988515a4730583315878e77c17a8a72b4b198e3fbf9"
GOLDEN_CHAIN = [  # block_keys(range(8), SCOPE, block_size=4)
    "9a92e3a69d528e48320f6e9b5aa097c16c30488e1874bb406bff52600349a4a4",
    "2e4e2e7fdf09e315c67be521687ed162324fd8eb8d434b1e0d1b999f095f281a",
]
GOLDEN_TENANT_T = "66bd1f65ffabe48ec5d9d29010993ee7b16adf8e99994a0a3f89870443db3780"
GOLDEN_ACME_SCOPE = "6afb215c345c70a17af5649e8d134bb4565bf685b7a07cc4909e3a85192bc70b"
GOLDEN_ACME_BLOCK = "0b41f76a60cd2317952179a696c22379a10562719c1ce7641b2d9d132935a7c9"


def test_golden_vectors():
    assert SCOPE.digest.hex() == GOLDEN_SCOPE_DIGEST
    assert [k.hex() for k in keys.block_keys(list(range(8)), SCOPE, 4)] == GOLDEN_CHAIN
    assert keys.block_keys([0, 1, 2, 3], SCOPE.with_tenant(b"t"), 4)[0].hex() == GOLDEN_TENANT_T
    assert ACME.hex() == GOLDEN_ACME_SCOPE
    acme = keys.KVScope("m", "float16", 1, ACME)
    assert keys.block_keys([5] * 64, acme)[0].hex() == GOLDEN_ACME_BLOCK


def test_spec_written_out_by_hand():
    """The documented formula, computed with hashlib alone, gives the same keys."""

    def frame(b: bytes) -> bytes:
        return struct.pack("<I", len(b)) + b

    scope = hashlib.blake2b(digest_size=32, person=b"kvgrid-scope-v1")
    for part in (b"llama3-8b@abc", b"bfloat16", struct.pack("<I", 1), b""):
        scope.update(frame(part))
    assert scope.hexdigest() == GOLDEN_SCOPE_DIGEST
    parent = b""
    for i, want in enumerate(GOLDEN_CHAIN):
        toks = struct.pack("<4I", *range(4 * i, 4 * i + 4))
        h = hashlib.blake2b(frame(parent) + frame(scope.digest()) + frame(toks),
                            digest_size=32, person=b"kvgrid-blk-v1")  # fmt: skip
        parent = h.digest()
        assert h.hexdigest() == want


def test_chain_continuation_and_single_block_agree():
    toks = list(range(1000, 1000 + 64 * 5 + 7))
    full = keys.block_keys(toks, SCOPE)
    assert len(full) == 5  # the trailing partial block has no key
    assert keys.block_keys(toks, SCOPE, parent=full[1], start_block=2) == full[2:]
    assert keys.block_key(full[0], SCOPE.digest, toks[64:128]) == full[1]


def test_tenant_and_scope_change_every_key():
    toks = list(range(128))
    base = keys.block_keys(toks, SCOPE)
    for other in (
        SCOPE.with_tenant(ACME),
        keys.KVScope("llama3-8b@abd", "bfloat16"),
        keys.KVScope("llama3-8b@abc", "float16"),
        keys.KVScope("llama3-8b@abc", "bfloat16", layout_version=2),
    ):
        assert set(keys.block_keys(toks, other)).isdisjoint(base)
    assert keys.tenant_scope(b"secret", "acme") != keys.tenant_scope(b"secret2", "acme")
    assert keys.tenant_scope(b"secret", "acme") != keys.tenant_scope(b"secret", "acme2")
    with pytest.raises(ValueError, match="secret"):
        keys.tenant_scope(b"", "acme")
    with pytest.raises(ValueError, match="token ids"):
        keys.block_keys([-1] * 64, SCOPE)


def test_same_keys_across_processes_with_different_hash_seeds():
    code = (
        "from kvgrid import keys;"
        "s = keys.KVScope('m', 'bfloat16', 1, keys.tenant_scope(b'k', 'acme'));"
        "print(','.join(k.hex() for k in keys.block_keys(list(range(300)), s)))"
    )
    outs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        outs.add(r.stdout.strip())
    assert len(outs) == 1
    assert len(outs.pop().split(",")) == 4
