"""Payload codecs: lossless compression by default; a lossy int8 codec behind an accuracy check.

Lossless: zstd (or zlib), skipped for a block that does not shrink by at least 3%, since
decompressing costs load bandwidth for nothing (bf16 KV often compresses little); a large
block is first tried on a 256 KiB slice, so a block that will not shrink costs little. Given
the write bandwidth of where the object goes, a block is compressed only where that pays:
the bytes the slice says it saves per second of compressing must exceed what the tier
writes per second (bf16 KV of random weights shrinks by a fifth at ~0.5 GB/s: 0.1 GB/s
saved, less than any disk writes, so it is stored raw). The codec is in the object's header.
Lossy ("int8"): symmetric int8 per channel (one scale per layer, K/V, head and dim, over
the block's tokens). It is applied to a block only if the block's round-trip relative error
||x - q(x)|| / ||x|| is at most the configured bound; otherwise the block is stored
lossless. Loaded int8 blocks do not reproduce a cold run bit for bit, hence off by default.

A zstd payload decoded into a given tensor (a G2 slot) is decompressed straight into it
through libzstd's one-shot call (ctypes, which releases the GIL), where ``zstandard`` would
return a fresh buffer per block, whose page faults serialise across loader threads, and a
copy after it; ``zstandard`` remains where no libzstd loads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import time
import warnings
import zlib

import numpy as np
import torch

from kvgrid.store.transfer import host_copy

try:
    import zstandard
except ImportError:  # zlib is always there
    zstandard = None

NONE, ZLIB, ZSTD, INT8 = 0, 1, 2, 3
NAMES = {NONE: "none", ZLIB: "zlib", ZSTD: "zstd", INT8: "int8"}
_MIN_GAIN = 0.97
_SAMPLE = 256 << 10  # bytes tried before compressing a whole block


class CodecError(ValueError):
    pass


@functools.cache
def _libzstd() -> ctypes.CDLL | None:
    for name in ("libzstd.so.1", ctypes.util.find_library("zstd")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            lib.ZSTD_decompress.restype = ctypes.c_size_t
            lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t] * 2
            lib.ZSTD_isError.restype = ctypes.c_uint
            lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
            lib.ZSTD_getErrorName.restype = ctypes.c_char_p
            lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _zstd_into(data, out: torch.Tensor) -> bool:
    """Decompress a one-frame zstd payload into ``out`` (exactly its size); False if no
    libzstd is loadable. libzstd writes at most ``out``'s bytes, whatever the payload says."""
    lib = _libzstd()
    if lib is None:
        return False
    src = np.frombuffer(data, dtype=np.uint8)
    dst = as_bytes(out)
    dst_addr = np.frombuffer(dst, dtype=np.uint8).ctypes.data
    n = lib.ZSTD_decompress(dst_addr, len(dst), src.ctypes.data if src.size else None, src.size)
    if lib.ZSTD_isError(n):
        raise CodecError(f"decompression failed: {lib.ZSTD_getErrorName(n).decode()}")
    if n != len(dst):
        raise CodecError(f"payload decodes to {n} bytes, header says {len(dst)}")
    return True


def _compress(data, codec: int, level: int) -> bytes:
    if codec == ZSTD:
        return zstandard.ZstdCompressor(level=level).compress(data)
    return zlib.compress(data, level)


def _decompress(data, codec: int, raw_len: int) -> bytes:
    if codec == ZSTD:
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_len)
    return zlib.decompress(data)


def as_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying."""
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


def from_bytes(data, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over ``data`` (read only: callers copy out of it, never into it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the buffer is not writable
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)


def _int8_encode(t: torch.Tensor, max_rel_error: float) -> bytes | None:
    if t.dim() < 3 or not t.is_floating_point():
        return None
    x = t.float()
    amax = x.abs().amax(dim=-3, keepdim=True)  # per channel, over the block's tokens
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(x / scale).clamp_(-127, 127)
    err = torch.linalg.vector_norm(x - q * scale)
    norm = torch.linalg.vector_norm(x)
    if not torch.isfinite(err) or float(err) > max_rel_error * max(float(norm), 1e-30):
        return None
    return bytes(as_bytes(scale.contiguous())) + bytes(as_bytes(q.to(torch.int8)))


def _int8_decode(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    sshape = list(shape)
    sshape[-3] = 1
    nscale = 4 * int(torch.Size(sshape).numel())
    if len(data) != nscale + int(torch.Size(shape).numel()):
        raise CodecError("int8 payload has the wrong length")
    scale = from_bytes(data[:nscale], torch.float32, tuple(sshape))
    q = from_bytes(data[nscale:], torch.int8, tuple(shape))
    return (q.float() * scale).to(dtype)


def pays(
    saved_fraction: float, compress_bytes_per_s: float, write_bytes_per_s: float | None
) -> bool:
    """Whether compressing is faster than writing the bytes it saves: one thread compresses
    then writes, so compressing N bytes costs N / compress and saves N x saved / write."""
    if write_bytes_per_s is None:
        return True
    return saved_fraction * compress_bytes_per_s > write_bytes_per_s


def encode(
    t: torch.Tensor,
    codec: str,
    level: int = 1,
    max_rel_error: float = 0.01,
    write_bytes_per_s: float | None = None,
) -> tuple[int, bytes | memoryview]:
    """(codec id, payload) for a contiguous CPU tensor. ``write_bytes_per_s``: what the
    destination writes per second (per writer), if known: a large block is then compressed
    only where its sample says that pays (``pays``)."""
    raw = as_bytes(t)
    if codec == "int8":
        q = _int8_encode(t, max_rel_error)
        if q is not None:
            return INT8, _compress(q, ZSTD if zstandard else ZLIB, level)
        codec = "zstd"  # failed the accuracy check: lossless instead
    if codec == "none":
        return NONE, raw
    cid = ZSTD if codec == "zstd" and zstandard is not None else ZLIB
    if len(raw) > 4 * _SAMPLE:
        # a block that will not shrink is not compressed at all: try a slice of it first,
        # so incompressible KV (random-looking bf16) costs a sliver of the compressor's time
        mid = (len(raw) // 2) & ~4095
        t0 = time.perf_counter()
        got = len(_compress(raw[mid : mid + _SAMPLE], cid, level))
        speed = _SAMPLE / max(time.perf_counter() - t0, 1e-9)
        if got > _MIN_GAIN * _SAMPLE or not pays(1 - got / _SAMPLE, speed, write_bytes_per_s):
            return NONE, raw
    packed = _compress(raw, cid, level)
    if len(packed) > _MIN_GAIN * len(raw):
        return NONE, raw
    return cid, packed


def decode(
    codec: int,
    data,
    raw_len: int,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The block tensor (CPU) of a payload, written into ``out`` if given (else it may be a
    view of ``data``); raises CodecError on anything malformed."""
    try:
        if codec == NONE:
            raw = data
        elif codec == ZSTD and out is not None and out.nbytes == raw_len and _zstd_into(data, out):
            return out
        elif codec in (ZLIB, ZSTD):
            if codec == ZSTD and zstandard is None:
                raise CodecError("object is zstd-compressed but zstandard is not installed")
            raw = _decompress(data, codec, raw_len)
        elif codec == INT8:
            inner = ZSTD if zstandard else ZLIB
            t = _int8_decode(_decompress(data, inner, 1 << 40), dtype, shape)
            return t if out is None else _into(out, t)
        else:
            raise CodecError(f"unknown codec id {codec}")
    except (zlib.error, RuntimeError) as e:
        raise CodecError(f"decompression failed: {e}") from None
    except Exception as e:
        if zstandard is not None and isinstance(e, zstandard.ZstdError):
            raise CodecError(f"decompression failed: {e}") from None
        raise
    if len(raw) != raw_len:
        raise CodecError(f"payload decodes to {len(raw)} bytes, header says {raw_len}")
    t = from_bytes(raw, dtype, shape)
    return t if out is None else _into(out, t)


def _into(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    if out.shape != t.shape or out.dtype != t.dtype:
        raise CodecError(f"block is {t.dtype}{list(t.shape)}, output {out.dtype}{list(out.shape)}")
    host_copy(out, t)
    return out
