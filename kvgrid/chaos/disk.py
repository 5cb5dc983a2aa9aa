"""Real storage faults: small filesystems to fill, read-only remounts, damaged objects.

Mounting needs root (CAP_SYS_ADMIN); the campaign and the tests run as root in CI.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from pathlib import Path


class MountError(OSError):
    """A filesystem could not be mounted (not root, or no tmpfs)."""


def mount_tmpfs(path: str | Path, size_bytes: int) -> Path:
    """Mount a tmpfs of ``size_bytes`` at ``path`` (created if missing)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(size_bytes)},mode=0700", "tmpfs", str(p)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise MountError(f"cannot mount a tmpfs at {p} (needs root): {r.stderr.strip()}")
    return p


def unmount(path: str | Path) -> None:
    """Unmount (lazily: files still open keep it alive until closed)."""
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: str | Path, mode: str) -> None:
    """Remount the filesystem at ``path`` ``"ro"`` or ``"rw"``."""
    if mode not in ("ro", "rw"):
        raise ValueError(f"mode must be 'ro' or 'rw', got {mode!r}")
    r = subprocess.run(
        ["mount", "-o", f"remount,{mode}", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise MountError(f"cannot remount {path} {mode}: {r.stderr.strip()}")


def fill(path: str | Path, name: str = ".filler") -> Path:
    """Fill the filesystem holding ``path`` to its last byte with one file; returns it
    (delete it to free the space)."""
    f = Path(path) / name
    chunk = bytes(1 << 16)
    with open(f, "ab", buffering=0) as out:
        while True:
            try:
                out.write(chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    return f


# ---- damaged objects (one object per file, as the disk tiers keep them) -------------------

DAMAGES = ("torn", "truncated", "swapped", "bitflip")


def objects(root: str | Path) -> list[Path]:
    """Every stored object file of one disk tier (its root)."""
    base = Path(root) / "objects"
    return sorted(base.rglob("*.kvo")) if base.is_dir() else []


def objects_under(path: str | Path) -> list[Path]:
    """Every stored object file below ``path`` (the tiers of several workers)."""
    try:
        return [p for p in Path(path).rglob("*.kvo") if p.is_file()]
    except OSError:
        return []


def damaged_bytes(data: bytes, kind: str, rng: random.Random, other: bytes = b"") -> bytes:
    """``data`` torn (its tail replaced by ``other``'s bytes, as a write interrupted across a
    block boundary), truncated, or with one bit flipped."""
    out = bytearray(data)
    if kind == "torn":
        cut = rng.randrange(len(out) // 2, len(out))
        out[cut:] = other[cut : len(out)].ljust(len(out) - cut, b"\0")
        if bytes(out) == data:  # the other object had the same tail
            out[-1] ^= 0xFF
    elif kind == "truncated":
        out = out[: rng.randrange(1, len(out))]
    elif kind == "bitflip":
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    else:
        raise ValueError(f"unknown damage {kind!r}; choose one of {DAMAGES}")
    return bytes(out)


def damage(files: list[Path], kind: str, rng: random.Random) -> list[Path]:
    """Damage stored objects in place, as a crash, a bad disk or an operator would: one
    object ``torn``, ``truncated`` or ``bitflip`` (``damaged_bytes``), or two ``swapped``
    (exchanged under each other's names). Returns the files changed."""
    files = [f for f in files if f.exists()]
    if not files:
        return []
    try:
        if kind == "swapped":
            if len(files) < 2:
                return []
            a, b = rng.sample(files, 2)
            tmp = a.with_suffix(".swap")
            os.rename(a, tmp)
            os.rename(b, a)
            os.rename(tmp, b)
            return [a, b]
        f = rng.choice(files)
        data = f.read_bytes()
        if len(data) < 2:
            return []
        other = rng.choice(files).read_bytes()
        new = damaged_bytes(data, kind, rng, other)
        # rewritten in place (same inode, as a disk error would leave it), times kept
        st = f.stat()
        with open(f, "r+b") as out:
            out.write(new)
            out.truncate(len(new))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        return [f]
    except OSError:  # the store removed it meanwhile, or it cannot be written
        return []
