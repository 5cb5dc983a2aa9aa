"""Secret files created safely when several processes start at once."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def write_secret_file(path: str | os.PathLike, text: str) -> bool:
    """Create ``path`` (mode 0600) holding ``text`` unless it exists; True if this call made
    it. The content is written and synced under a temporary name, then linked into place,
    which fails if another process got there first: no reader ever sees an empty or partial
    file, and no writer overwrites another's."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)
