"""Write processes: blocks going down to the disk tiers encoded, encrypted and written to
their temp files in helper processes instead of on the write-down's threads.

A writer thread that encodes and writes an object in the engine's process takes the GIL
back after each system call and the encryption, and the engine's thread may wait each
time (``kvgrid.bench.gpu.profile_gil --writes`` measures it). With ``write_procs`` set, a
writer thread copies up to BATCH blocks from their G2 slots into a process's staging slots
(a memcpy without the GIL), sends one request naming each block's temp files (one per
tier), and waits for the one reply without the GIL. The rest stays in the engine's
process, where the tiers' state lives: the ledger reservation of the objects' bytes (their
lengths are known only once encoded; one ledger update per run), the renames into place
and directory flushes (``DiskTier.adopt_many`` and ``commit``), metrics, events and the
block ledger.

Primitives (besides ``FetchProcs``' ``configure``, ``fits`` and ``close``):
    write_many(items, blocks, encode)
                up to BATCH blocks in one request; per block ("ok", object length,
                [(None or (errno, message), seconds writing) per temp file]);
                FetchProcError where a process died or hung (it is started again; the
                caller writes those blocks itself)
"""

from __future__ import annotations

import torch

from kvgrid.store.fetch_procs import BATCH, FetchProcs
from kvgrid.store.object import dtype_name


class WriteProcs(FetchProcs):
    """``n`` write processes and their staging slots (see the module's docstring)."""

    role = "write"
    readahead = False

    def write_many(self, items: list[tuple], blocks: list[torch.Tensor], encode: tuple) -> list:
        """Encode and write ``blocks`` (contiguous CPU tensors ``fits`` takes), each item
        (key, parent key, tenant, token count, [(temp path, sync)]); ``encode``: (codec,
        level, lossy max error, model fingerprint, layout version, write bytes/s or None)."""
        if not 0 < len(items) == len(blocks) <= BATCH:
            raise ValueError(f"a batch takes 1 to {BATCH} blocks, one item each")
        names = [(dtype_name(b.dtype), tuple(b.shape)) for b in blocks]

        def fill(i: int) -> None:
            for j, (b, (dt, shape)) in enumerate(zip(blocks, names)):
                self.slot(i, j, dt, shape).copy_(b)  # a memcpy without the GIL

        request = [(*it[:4], dt, shape, it[4]) for it, (dt, shape) in zip(items, names)]
        i, replies = self._call("write", request, encode, fill)
        self._idle.put(i)
        self.served += len(items)
        return replies
