"""A writer killed with SIGKILL mid-write leaves misses, never torn objects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig
from kvgrid.store.crypto import KeyRing

SCOPE = keys.KVScope("crash-model", "float32")
SHAPE = (4, 2, 64, 4, 64)  # 1 MiB per block: writes take long enough to be cut
N = 400

WRITER = """
import os, sys, time, torch
from kvgrid import keys
# the window a kill must hit lies between a temp file's first byte and its rename; a busy
# machine spends most of a write encrypting, before the file exists, so the window is
# widened here: the kill still lands on the store's own code, at a random point of it
_rename = os.rename
def slow_rename(src, dst):
    time.sleep(0.005)
    _rename(src, dst)
os.rename = slow_rename
from kvgrid.store import ContextStore, StoreConfig
scope = keys.KVScope("crash-model", "float32")
ks = keys.block_keys(list(range(64 * {n})), scope, 64)
cfg = StoreConfig(g2_bytes=0, g3_dir=sys.argv[1], g3_bytes=1 << 34, codec="none",
                  admit_after={{"G3": 1}}, sweep_interval_s=0, io_workers=2, io_queue=4,
                  io_block_s=30)
store = ContextStore(cfg)
for i, k in enumerate(ks):
    t = torch.randn({shape}, generator=torch.Generator().manual_seed(i))
    store.put(k, None, b"", t, 64)
    print(i, flush=True)
"""


def expected(i: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(i))


def test_sigkill_mid_write_leaves_only_valid_objects_or_misses(tmp_path):
    key_hex = os.urandom(32).hex()
    env = dict(os.environ, KVGRID_MASTER_KEY=f"1:{key_hex}")
    ks = keys.block_keys(list(range(64 * N)), SCOPE, 64)
    g3 = tmp_path / "g3"
    script = WRITER.format(n=N, shape=SHAPE)
    leftovers = 0
    # each kill lands at a random point of a write; on a busy machine most of a write's time
    # can go to encryption before its temp file exists, so kill until one is caught mid-way
    for round_ in range(12):
        if leftovers and round_ >= 3:
            break
        proc = subprocess.Popen([sys.executable, "-c", script, str(g3)], env=env,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        # let it get well into writing, then kill it while writes are in flight
        for _ in range(8 + 5 * round_):
            assert proc.stdout.readline(), "the writer died on its own"
        time.sleep(0.01 * (round_ % 4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        leftovers += len(os.listdir(g3 / "tmp"))
    assert leftovers > 0, "no write was ever cut mid-way; the test proves nothing"
    # a restarted store: temp files cleaned, every object valid or absent
    cfg = StoreConfig(g2_bytes=0, g3_dir=g3, g3_bytes=1 << 34, sweep_interval_s=0)
    store = ContextStore(cfg, keyring=KeyRing({1: bytes.fromhex(key_hex)}))
    assert os.listdir(g3 / "tmp") == []
    present = 0
    for i, k in enumerate(ks):
        got = store.get(k, b"")
        if got is not None:
            assert torch.equal(got, expected(i))
            present += 1
    assert present >= 8  # at most io_queue writes were in flight after each announced put
    assert store.metrics.total("integrity_failures") == 0  # nothing torn was ever visible
    # usage was recounted from what is really there (cut reservations dropped)
    real = sum(p.stat().st_size for p in (g3 / "objects").rglob("*.kvo"))
    assert store.tier("G3").used() == real
    store.close()
