"""Keys: a master key ring (with key ids, for rotation) and per-tenant AES-256-GCM keys.

The master key comes from ``KVGRID_MASTER_KEY`` or a key file; the embedded default
generates one under the kvgrid cache dir with 0600 permissions. Key text is one key per
line, ``<id>:<64 hex>`` (a bare ``<64 hex>`` is id 1); the highest id encrypts new
objects, every listed id still decrypts. Tenant keys are HKDF-SHA256(master,
info = person | frame(tenant scope) | key id), so a tenant's objects can only be opened
with that tenant's key even if two objects were swapped on disk.
"""

from __future__ import annotations

import contextlib
import secrets
import stat
import struct
import threading
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kvgrid import envs
from kvgrid.secretfile import write_secret_file
from kvgrid.store.aead import AEAD, make_aead

_INFO = b"kvgrid-store-tenant-key-v1"


class MasterKeyError(ValueError):
    """A master key that cannot be used (bad format, unsafe permissions)."""


def parse_keys(text: str) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for raw in text.replace(",", "\n").replace(";", "\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        kid, _, hexkey = line.rpartition(":")
        try:
            key = bytes.fromhex(hexkey)
            key_id = int(kid) if kid else 1
        except ValueError as e:
            raise MasterKeyError(f"master key line is not '<id>:<64 hex digits>': {e}") from None
        if len(key) != 32:
            raise MasterKeyError(f"master key {key_id} is {len(key)} bytes; AES-256 needs 32")
        if not 0 < key_id < 2**32:
            raise MasterKeyError(f"master key id {key_id} out of range")
        out[key_id] = key
    if not out:
        raise MasterKeyError("no master key found")
    return out


class KeyRing:
    def __init__(self, masters: dict[int, bytes], current: int | None = None) -> None:
        if not masters:
            raise MasterKeyError("a key ring needs at least one master key")
        self.masters = dict(masters)
        self.current_id = current if current is not None else max(masters)
        if self.current_id not in self.masters:
            raise MasterKeyError(f"current key id {self.current_id} is not in the ring")
        self._aeads: dict[tuple[int, bytes], AEAD] = {}
        self._lock = threading.Lock()

    def aead(self, key_id: int, tenant: bytes) -> AEAD | None:
        """The tenant's cipher under master ``key_id``; None if that id is unknown."""
        k = (key_id, tenant)
        with self._lock:
            a = self._aeads.get(k)
            if a is None:
                master = self.masters.get(key_id)
                if master is None:
                    return None
                info = _INFO + struct.pack("<I", len(tenant)) + tenant + struct.pack("<I", key_id)
                key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
                    master
                )
                a = self._aeads[k] = make_aead(key)
            return a

    @classmethod
    def from_file(cls, path: str | Path) -> KeyRing:
        p = Path(path)
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise MasterKeyError(f"master key file {p} is readable by others; chmod 600 it")
        return cls(parse_keys(p.read_text()))


def generate_key_file(path: str | Path) -> Path:
    """Create a key file with one fresh key (id 1), 0600, never overwriting one; safe when
    several workers start at once (the file appears whole or not at all)."""
    p = Path(path)
    if not write_secret_file(p, f"1:{secrets.token_hex(32)}\n"):
        raise FileExistsError(f"{p} exists")
    return p


def rotate_key_file(path: str | Path) -> int:
    """Append a new key with the next id; it encrypts new objects, old ids still decrypt."""
    p = Path(path)
    ring = KeyRing.from_file(p)
    new_id = max(ring.masters) + 1
    with open(p, "a") as f:
        f.write(f"{new_id}:{secrets.token_hex(32)}\n")
    return new_id


def load_keyring(
    master_key_file: str | Path | None = None, default_dir: Path | None = None
) -> KeyRing:
    """The key ring from (in order) an explicit file, $KVGRID_MASTER_KEY, or the local
    default file under ``default_dir`` (generated on first use)."""
    if master_key_file:
        return KeyRing.from_file(master_key_file)
    if envs.KVGRID_MASTER_KEY.is_set():
        return KeyRing(parse_keys(envs.KVGRID_MASTER_KEY.get()))
    if default_dir is None:
        from kvgrid.store.config import default_store_dir

        default_dir = default_store_dir()
    path = Path(default_dir) / "master.key"
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first
            generate_key_file(path)
    return KeyRing.from_file(path)
