"""AES-256-GCM that runs in parallel threads: OpenSSL's EVP interface through ctypes.

``cryptography``'s AESGCM holds the GIL while it encrypts (measured: two threads decrypt no
faster than one), so a store whose loads and write-backs run on a dozen threads would
decrypt on one core, and its background writes would stall the engine's own thread. ctypes
releases the GIL for the length of each foreign call, so here every thread runs OpenSSL's
AES-NI code at once. The format is the same as ``cryptography``'s (ciphertext || 16-byte
tag, 12-byte nonce), which stays the fallback where no ``libcrypto`` can be loaded and the
oracle the tests check this against.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Protocol

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

log = logging.getLogger(__name__)

TAG_BYTES = 16
_GCM_SET_TAG, _GCM_GET_TAG = 0x11, 0x10  # EVP_CTRL_GCM_SET_TAG / _GET_TAG
_P, _I = ctypes.c_void_p, ctypes.c_int


class AEAD(Protocol):
    def encrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes | memoryview: ...
    def decrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes | memoryview: ...


@functools.cache
def _libcrypto() -> ctypes.CDLL | None:
    for name in ("libcrypto.so.3", ctypes.util.find_library("crypto")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.EVP_aes_256_gcm.restype = _P
            lib.EVP_CIPHER_CTX_new.restype = _P
            lib.EVP_CIPHER_CTX_free.argtypes = [_P]
            for f in ("EVP_EncryptInit_ex", "EVP_DecryptInit_ex"):
                getattr(lib, f).argtypes = [_P, _P, _P, _P, _P]
            for f in ("EVP_EncryptUpdate", "EVP_DecryptUpdate"):
                getattr(lib, f).argtypes = [_P, _P, ctypes.POINTER(_I), _P, _I]
            for f in ("EVP_EncryptFinal_ex", "EVP_DecryptFinal_ex"):
                getattr(lib, f).argtypes = [_P, _P, ctypes.POINTER(_I)]
            lib.EVP_CIPHER_CTX_ctrl.argtypes = [_P, _I, _I, _P]
            return lib
        except (OSError, AttributeError):
            continue
    log.warning("no usable libcrypto: AES-GCM falls back to `cryptography` (holds the GIL)")
    return None


def _addr(buf: bytes | bytearray | memoryview) -> int:
    # the buffer's own address (no copy); the caller keeps ``buf`` alive across the call
    return np.frombuffer(buf, dtype=np.uint8).ctypes.data if len(buf) else 0


class OpenSSLGCM:
    """AES-256-GCM over libcrypto's EVP calls, one cipher context per call (thread-safe)."""

    def __init__(self, key: bytes, lib: ctypes.CDLL) -> None:
        if len(key) != 32:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._key, self._lib = key, lib
        self._cipher = lib.EVP_aes_256_gcm()

    def _run(self, enc: bool, nonce: bytes, data, aad: bytes, tag, out=None) -> memoryview:
        lib = self._lib
        if len(nonce) != 12:
            raise ValueError("AES-GCM nonce must be 12 bytes")
        n = len(data)
        if out is not None:
            arr = np.frombuffer(out, dtype=np.uint8)
            want = n + (TAG_BYTES if enc else 0)
            if arr.size != want or not arr.flags.writeable:
                raise ValueError(f"output buffer must be {want} writable bytes")
        else:
            # np.empty, not bytearray: a bytearray is zeroed through fresh pages on every
            # call, and the page faults of parallel threads serialise on the memory map
            arr = np.empty(n + (TAG_BYTES if enc else 0), dtype=np.uint8)
        out = memoryview(arr)
        outl = _I(0)
        ctx = lib.EVP_CIPHER_CTX_new()
        if not ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        init, update, final = (
            (lib.EVP_EncryptInit_ex, lib.EVP_EncryptUpdate, lib.EVP_EncryptFinal_ex)
            if enc
            else (lib.EVP_DecryptInit_ex, lib.EVP_DecryptUpdate, lib.EVP_DecryptFinal_ex)
        )
        try:
            ok = init(ctx, self._cipher, None, self._key, _addr(nonce)) == 1
            if aad:
                ok = ok and update(ctx, None, ctypes.byref(outl), _addr(aad), len(aad)) == 1
            dst = arr.ctypes.data
            ok = ok and (n == 0 or update(ctx, dst, ctypes.byref(outl), _addr(data), n) == 1)
            if not ok:
                raise RuntimeError("OpenSSL AES-GCM setup failed")
            if enc:
                if final(ctx, dst + n, ctypes.byref(outl)) != 1:
                    raise RuntimeError("OpenSSL AES-GCM encryption failed")
                if lib.EVP_CIPHER_CTX_ctrl(ctx, _GCM_GET_TAG, TAG_BYTES, dst + n) != 1:
                    raise RuntimeError("OpenSSL AES-GCM tag failed")
            else:
                tag_buf = ctypes.create_string_buffer(bytes(tag), TAG_BYTES)
                if lib.EVP_CIPHER_CTX_ctrl(ctx, _GCM_SET_TAG, TAG_BYTES, tag_buf) != 1:
                    raise RuntimeError("OpenSSL AES-GCM tag failed")
                if final(ctx, dst + n, ctypes.byref(outl)) != 1:
                    raise InvalidTag()
        finally:
            lib.EVP_CIPHER_CTX_free(ctx)
        return out

    def encrypt(self, nonce: bytes, data, aad: bytes, out=None) -> memoryview:
        """``ciphertext || tag`` (a bytes-like view), written into ``out`` if given (a
        writable buffer of exactly that size: a reused one spares the page faults of fresh
        memory, which cost more than the encryption)."""
        return self._run(True, nonce, data, aad, None, out)

    def decrypt(self, nonce: bytes, data, aad: bytes, out=None) -> memoryview:
        """Plaintext (a writable bytes-like view) of ``ciphertext || tag``, written into
        ``out`` if given; ``InvalidTag`` if the tag does not verify (and then ``out`` holds
        unauthenticated bytes that must not be used)."""
        view = memoryview(data)
        if len(view) < TAG_BYTES:
            raise InvalidTag()
        return self._run(False, nonce, view[:-TAG_BYTES], aad, view[-TAG_BYTES:], out)


def decrypt_into(aead: AEAD, nonce: bytes, data, aad: bytes, out) -> None:
    """Decrypt ``ciphertext || tag`` into the writable buffer ``out`` (its plaintext size):
    in place of a new buffer with OpenSSL, through one with ``cryptography``. Raises
    ``InvalidTag``, and ``out`` then holds bytes that must not be used."""
    if isinstance(aead, OpenSSLGCM):
        aead.decrypt(nonce, data, aad, out)
    else:
        _copy_into(out, aead.decrypt(nonce, bytes(data), aad))


def encrypt_into(aead: AEAD, nonce: bytes, data, aad: bytes, out) -> None:
    """Encrypt ``data`` into the writable buffer ``out`` (``len(data)`` + the tag): in place
    with OpenSSL, through a new buffer with ``cryptography``."""
    if isinstance(aead, OpenSSLGCM):
        aead.encrypt(nonce, data, aad, out)
    else:
        _copy_into(out, aead.encrypt(nonce, bytes(data), aad))


def _copy_into(out, data: bytes) -> None:
    dst = np.frombuffer(out, dtype=np.uint8)
    if dst.size != len(data):
        raise ValueError(f"output buffer must be {len(data)} bytes")
    np.copyto(dst, np.frombuffer(data, dtype=np.uint8))


def make_aead(key: bytes, backend: str = "auto") -> AEAD:
    """``auto``: OpenSSL through ctypes where libcrypto loads, else ``cryptography``."""
    if backend not in ("auto", "openssl", "cryptography"):
        raise ValueError(f"unknown AES-GCM backend {backend!r}")
    lib = _libcrypto() if backend != "cryptography" else None
    if lib is not None:
        return OpenSSLGCM(key, lib)
    if backend == "openssl":
        raise RuntimeError("the OpenSSL AES-GCM backend needs a loadable libcrypto")
    return AESGCM(key)
