"""kvgrid's AES-256-GCM (OpenSSL through ctypes, so threads run in parallel) against the
`cryptography` package as the oracle: same bytes out, same failures on tampering."""

from __future__ import annotations

import os

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvgrid.store.aead import OpenSSLGCM, _libcrypto, make_aead

pytestmark = pytest.mark.skipif(_libcrypto() is None, reason="no libcrypto on this machine")
KEY, NONCE, AAD = os.urandom(32), os.urandom(12), b"header bytes"


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 4096, 1 << 20])
def test_same_ciphertext_and_round_trip_as_cryptography(size):
    ours, ref = make_aead(KEY, "openssl"), AESGCM(KEY)
    assert isinstance(ours, OpenSSLGCM)
    data = os.urandom(size)
    ct = ref.encrypt(NONCE, data, AAD)
    assert bytes(ours.encrypt(NONCE, data, AAD)) == ct
    assert bytes(ours.decrypt(NONCE, ct, AAD)) == data
    assert ref.decrypt(NONCE, bytes(ours.encrypt(NONCE, data, AAD)), AAD) == data
    # memoryview inputs (slices of a larger object) work the same
    blob = b"xx" + ct
    assert bytes(ours.decrypt(NONCE, memoryview(blob)[2:], memoryview(AAD))) == data


def test_tampering_fails_like_cryptography():
    ours = make_aead(KEY, "openssl")
    ct = bytearray(AESGCM(KEY).encrypt(NONCE, os.urandom(1000), AAD))
    flipped = bytearray(ct)
    flipped[10] ^= 1
    tag_flipped = bytearray(ct)
    tag_flipped[-1] ^= 0x80
    cases = [
        (bytes(flipped), AAD, KEY),
        (bytes(tag_flipped), AAD, KEY),
        (bytes(ct), AAD + b"!", KEY),  # another header
        (bytes(ct), AAD, os.urandom(32)),  # another tenant's key
        (bytes(ct[:10]), AAD, KEY),  # shorter than a tag
    ]
    for data, aad, key in cases:
        with pytest.raises(InvalidTag):
            make_aead(key, "openssl").decrypt(NONCE, data, aad)
        if len(data) >= 16:
            with pytest.raises(InvalidTag):
                AESGCM(key).decrypt(NONCE, data, aad)
    assert bytes(ours.decrypt(NONCE, bytes(ct), AAD)) == AESGCM(KEY).decrypt(NONCE, bytes(ct), AAD)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="32-byte key"):
        make_aead(b"short", "openssl")
    with pytest.raises(ValueError, match="nonce"):
        make_aead(KEY, "openssl").encrypt(b"123", b"data", b"")
    with pytest.raises(ValueError, match="backend"):
        make_aead(KEY, "rot13")
    assert isinstance(make_aead(KEY, "cryptography"), AESGCM)
