"""Tier bandwidth probes: what loading from each tier costs on this machine, measured at start.

Load-versus-recompute needs each tier's bandwidth before the first load has measured it. A
probe writes a few block-sized objects (random values of the engine's block shape and dtype,
through the store's codec and encryption) under a tenant of its own, drops them from the page
cache, and reads them back cold with the store's load threads, verifying and decoding each as
a load does: bytes of KV per second. The objects are removed afterwards. Every load and
prefetch after that refines the figure (``ContextStore._observe_load``). The writes are
timed too: the write-down's first figure of what one writer puts into the tier per second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from kvgrid import keys as kvkeys
from kvgrid.store.object import decode_object, encode_object, tenant_id
from kvgrid.store.tier import ObjectTier

log = logging.getLogger(__name__)

PROBE_TENANT = b"kvgrid-bandwidth-probe"
PROBE_BYTES = 64 << 20  # at most this much KV per tier, at least two blocks


def probe_tier(store, tier: ObjectTier, threads: int) -> float | None:
    """Cold load bandwidth of ``tier`` (bytes of KV per second), or None if it failed."""
    shape, dtype = store.block_shape, store.block_dtype
    if shape is None or not tier.up:
        return None
    block = torch.randn(shape, dtype=torch.float32).to(dtype)
    n = max(2, min(threads, PROBE_BYTES // max(1, block.nbytes)))
    tid = tenant_id(PROBE_TENANT)
    cfg = store.config
    ks = kvkeys.block_keys(list(range(n)), os.urandom(16), 1)
    try:
        spent = written = 0
        for k in ks:
            blob = encode_object(
                block, k, None, PROBE_TENANT, 1, store.keyring, cfg.codec,
                cfg.compression_level, cfg.lossy_max_rel_error, cfg.model_fingerprint,
                kvkeys.KV_LAYOUT_VERSION,
            )  # fmt: skip
            t0 = time.perf_counter()
            if not tier.put(tid, k, blob).stored:
                return None
            spent += time.perf_counter() - t0
            written += len(blob)
        # what one writer puts into the tier per second: the write-down's codec decides
        # from it whether compressing pays, from its first object on
        store.writes.observe_write(tier.name, written, spent)
        tier.wont_need(tid, ks)  # a cold read, as of a block written a while ago

        def read(k: bytes) -> int:
            got = tier.get(tid, k)
            if got is None:
                raise OSError("probe object vanished")
            return decode_object(got, k, PROBE_TENANT, store.keyring, dtype, shape)[1].nbytes

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max(1, min(threads, n))) as pool:
            nbytes = sum(pool.map(read, ks))
        return nbytes / max(time.perf_counter() - t0, 1e-9)
    except Exception as e:
        log.warning("bandwidth probe of %s failed: %s", tier.name, e)
        return None
    finally:
        for k in ks:
            with contextlib.suppress(Exception):
                tier.delete(tid, k)
