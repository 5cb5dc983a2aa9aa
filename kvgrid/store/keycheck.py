"""A shared tier (G4) records which master keys seal its objects, and every server checks.

Every server of a G4 tier must hold the same master key: objects sealed under another key
fail authentication, and each would be a silent miss. So the tier keeps one small record,
``keycheck``: per master key id, a fingerprint of the key (HMAC-SHA256 of the key over a
fixed label; it reveals nothing of the key). The first server writes it; a server whose
key of the same id has another fingerprint refuses to start, naming the fix.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging

from kvgrid.store.crypto import KeyRing, MasterKeyError
from kvgrid.store.tier import ObjectTier

log = logging.getLogger(__name__)

RECORD = "keycheck"
_LABEL = b"kvgrid-shared-tier-keycheck-v1"


def fingerprints(ring: KeyRing) -> dict[str, str]:
    return {
        str(kid): hmac.new(key, _LABEL, hashlib.sha256).hexdigest()[:32]
        for kid, key in ring.masters.items()
    }


def check_shared_tier(tier: ObjectTier, ring: KeyRing) -> None:
    """Raise MasterKeyError when ``tier`` holds objects sealed under another master key
    with an id this ring also has; record this ring's keys otherwise."""
    mine = fingerprints(ring)
    for _ in range(3):  # a concurrent writer may move the record between read and write
        raw = tier.read_meta(RECORD)
        if raw is None:
            if tier.write_meta(RECORD, json.dumps(mine).encode()):
                return
            continue
        try:
            theirs = json.loads(raw)
            if not isinstance(theirs, dict):
                raise ValueError
        except ValueError:
            raise MasterKeyError(f"{tier.name}: its {RECORD} record is damaged") from None
        clash = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
        if clash:
            raise MasterKeyError(
                f"{tier.name} ({tier.backend}) holds objects sealed under another master key "
                f"(key id {', '.join(clash)}): every server of a shared tier needs the same "
                "master key (--kv-master-key-file or KVGRID_MASTER_KEY)"
            )
        missing = sorted(theirs.keys() - mine.keys())
        if missing:
            log.warning(
                "%s holds objects under master key id %s, which this server does not have: "
                "they read as misses here",
                tier.name,
                ", ".join(missing),
            )
        if mine.keys() <= theirs.keys():
            return
        if tier.write_meta(RECORD, json.dumps({**theirs, **mine}).encode(), replace=True):
            return
    log.warning("%s: could not record the master key fingerprints", tier.name)
