"""KVLoader: brings blocks up from the context store without stalling the engine.

A request whose prefix sits below G1 is admitted at once; its blocks are loaded on a
background thread (and, on a GPU, a side stream) while the engine keeps stepping the
other requests. The load can also be split: the first blocks of the stored prefix are
recomputed on the GPU *while* the later ones load, since a block's stored K/V does not
depend on computing the blocks before it. Balancing the two makes the time to first token
the smaller of load and recompute, or less.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector


@dataclass(frozen=True)
class LoadPlan:
    compute_blocks: int  # leading stored blocks recomputed instead, overlapping the load
    load_blocks: int  # the stored blocks after those, loaded


def plan_split(
    stored_blocks: int,
    block_tokens: int,
    prefill_tokens_per_s: float | None,
    load_s_per_block: float | None,
) -> LoadPlan:
    """Minimise max(recompute c blocks, load the other n - c): they run at the same time."""
    if not stored_blocks or not prefill_tokens_per_s or load_s_per_block is None:
        return LoadPlan(0, stored_blocks)
    tc = block_tokens / prefill_tokens_per_s
    c = round(stored_blocks * load_s_per_block / (tc + load_s_per_block))
    return LoadPlan(c, stored_blocks - c)


class KVLoader:
    def __init__(self, connector: StoreConnector, device: torch.device, max_workers: int = 2):
        self.connector = connector
        self.device = device
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-load")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def submit(self, keys: list[bytes], tenant: bytes, block_ids: list[int]) -> Future:
        return self.pool.submit(self._load, keys, tenant, block_ids)

    def _load(self, keys: list[bytes], tenant: bytes, block_ids: list[int]) -> int:
        ctx = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with ctx:
            n = self.connector.load(keys, tenant, block_ids)
        if self.stream is not None:
            # the blocks must be in device memory before any forward pass reads them
            self.stream.synchronize()
        return n

    def close(self) -> None:
        self.pool.shutdown(wait=True)
