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
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector
    from kvgrid.store.landing import LayerLanding
    from kvgrid.store.policy import LoadDeadline


# A load submitted while a step is being scheduled starts once the engine has launched that
# step, or after this long at most (the engine signals every step; this only bounds a miss).
# Started at once, a split's load threads (a dozen, each taking the GIL between its reads,
# decryptions and copies) held the engine thread's launch of the recomputed part to the
# load's own pace: 821 ms to launch a 21K-token prefill step (an eager step launches in
# ~23 ms whatever its length; H200, bench/gpu_store.py).
LAUNCH_GATE_S = 0.25

# Host work of the extra prefill chunk a split adds (scheduling, input building): a split
# must win by more than this, so a fast tier (G2) is simply loaded.
SPLIT_OVERHEAD_S = 0.02


@dataclass(frozen=True)
class LoadPlan:
    compute_blocks: int  # leading stored blocks recomputed instead, overlapping the load
    load_blocks: int  # the stored blocks after those, loaded
    expected_s: float | None = None  # predicted time until both parts are done
    load_s: float | None = None  # predicted time of the loaded part alone, once started


# Under load, a split recomputes as little as keeps the request within this share of its
# own recompute time (the rest of the margin absorbs misjudged tier speeds).
GUARANTEE_MARGIN = 0.9


def plan_blocks(
    load_s: list[float],
    block_tokens: int,
    prefill_tokens_per_s: float | None,
    overhead_s: float = SPLIT_OVERHEAD_S,
    start_s: float = 0.0,
    busy: bool = False,
) -> LoadPlan:
    """Split a stored prefix whose blocks cost ``load_s[i]`` seconds each to load: recompute
    the first c while loading the rest, minimising max(overhead + c * recompute, start +
    load of blocks c..), where the load starts ``start_s`` late (it waits for the engine to
    launch the step that computes the first part: ``KVLoader``). Split only where that beats
    loading everything by 10% (the costs are estimates); never recompute all of it
    (``lookup`` decides whether to use it at all).

    ``busy``: other requests wait for the GPU, so every block loaded instead of recomputed
    is GPU time they get; the request itself need only not be slower than its own recompute.
    Then c is the smallest split whose predicted time stays within ``GUARANTEE_MARGIN`` of
    recomputing all n blocks (the most loaded), if there is one."""
    n = len(load_s)
    total = float(sum(load_s))
    if n < 2 or not prefill_tokens_per_s:
        return LoadPlan(0, n, start_s + total, total)
    tc = block_tokens / prefill_tokens_per_s
    if busy:
        bound, rest = GUARANTEE_MARGIN * n * tc, total
        for c in range(n):
            if c:
                rest -= load_s[c - 1]
            t = max(overhead_s + c * tc if c else 0.0, start_s + rest)
            if t <= bound:
                return LoadPlan(c, n - c, t, rest)
    best_c, best, rest = 0, start_s + total, total
    for c in range(1, n):
        rest -= load_s[c - 1]  # load time of blocks c..n-1
        t = max(overhead_s + c * tc, start_s + rest)
        if t < best:
            best_c, best, best_rest = c, t, rest
        elif overhead_s + c * tc > start_s + rest:
            break  # the recompute side only grows from here
    if best_c == 0 or best >= 0.9 * (start_s + total):
        return LoadPlan(0, n, start_s + total, total)
    return LoadPlan(best_c, n - best_c, best, best_rest)


@dataclass(frozen=True)
class LoadResult:
    blocks: int  # leading blocks landed (or, with ``landing``, landing)
    landing: LayerLanding | None = None  # still in flight: the forward waits layer by layer


class KVLoader:
    """``layered``: a prefix wholly in G2 lands layer by layer while the forward over it runs
    (``kvgrid.store.landing``); default on CUDA. Otherwise the load completes first."""

    def __init__(
        self,
        connector: StoreConnector,
        device: torch.device,
        max_workers: int = 2,
        layered: bool | None = None,
    ):
        self.connector = connector
        self.device = device
        self.layered = device.type == "cuda" if layered is None else layered
        self.pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="kv-load")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._gate = threading.Event()  # set once the step being scheduled is launched

    def submit(
        self,
        keys: list[bytes],
        tenant: bytes,
        block_ids: list[int],
        deadline: float | LoadDeadline | None = None,
        split: bool = False,
    ) -> Future:
        """Load in the background; the future's result is a ``LoadResult``. Past
        ``deadline`` (time.monotonic(), or a ``LoadDeadline`` the caller may move) the load
        stops and the rest is recomputed. ``split``: the step being scheduled computes the
        request's first blocks; how late the load then starts is measured for the planner."""
        t0 = time.perf_counter()
        timed = t0 if split else None
        fut = self.pool.submit(self._load, keys, tenant, block_ids, deadline, self._gate, timed)
        self.connector.engine_time.add("load_submit", time.perf_counter() - t0)
        return fut

    def step_launched(self) -> None:
        """The engine has launched (or skipped) the step its scheduler just planned: the
        loads submitted while planning it may start."""
        gate, self._gate = self._gate, threading.Event()
        gate.set()

    def _load(
        self, keys: list[bytes], tenant: bytes, block_ids: list[int], deadline, gate, t_submit
    ) -> LoadResult:
        if not gate.is_set():
            # the disk can read while the engine launches: its readahead takes no GIL
            self.connector.will_load(keys, tenant)
            gate.wait(LAUNCH_GATE_S)
        if t_submit is not None:
            self.connector.observe_load_start(time.perf_counter() - t_submit)
        ctx = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        with ctx:
            if self.layered:
                landing = self.connector.load_layered(keys, tenant, block_ids)
                if landing is not None:
                    return LoadResult(len(keys), landing)
            n = self.connector.load(keys, tenant, block_ids, deadline)
        if self.stream is not None:
            # the blocks must be in device memory before any forward pass reads them
            self.stream.synchronize()
        return LoadResult(n)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
