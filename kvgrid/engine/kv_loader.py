"""KVLoader: brings blocks up from the context store without stalling the engine.

A request whose prefix sits below G1 is admitted at once; its blocks are loaded on a
background thread (and, on a GPU, a side stream) while the engine keeps stepping the
other requests. The load can also be split: the first blocks of the stored prefix are
recomputed on the GPU *while* the later ones load (planned by the store's connector,
``kvgrid.store.load_plan``).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvgrid.store.connector import StoreConnector
    from kvgrid.store.landing import LayerLanding
    from kvgrid.store.load_plan import LoadDeadline


# A load submitted while a step is being scheduled starts once the engine has launched that
# step, or after this long at most (the engine signals every step; this only bounds a miss).
# Started at once, a split's load threads (a dozen, each taking the GIL between its reads,
# decryptions and copies) held the engine thread's launch of the recomputed part to the
# load's own pace: 821 ms to launch a 21K-token prefill step (an eager step launches in
# ~23 ms whatever its length; H200, kvgrid.bench.gpu.store).
LAUNCH_GATE_S = 0.25


@dataclass(frozen=True)
class LoadTiming:
    """One load's way: queued (submit to its thread starting, the launch gate included),
    then issued (until its result: with ``layered`` the copies are then in flight)."""

    queued_s: float
    issue_s: float
    layered: bool
    blocks: int


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
        self.timings: deque[LoadTiming] = deque(maxlen=4096)  # the latest loads' ways

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
        fut = self.pool.submit(self._load, keys, tenant, block_ids, deadline, self._gate, t0, split)
        self.connector.engine_time.add("load_submit", time.perf_counter() - t0)
        return fut

    def step_launched(self) -> None:
        """The engine has launched (or skipped) the step its scheduler just planned: the
        loads submitted while planning it may start."""
        gate, self._gate = self._gate, threading.Event()
        gate.set()

    def _load(
        self,
        keys: list[bytes],
        tenant: bytes,
        block_ids: list[int],
        deadline,
        gate,
        t_submit: float,
        split: bool,
    ) -> LoadResult:
        if not gate.is_set():
            # the disk can read while the engine launches: its readahead takes no GIL
            self.connector.will_load(keys, tenant)
            gate.wait(LAUNCH_GATE_S)
        t_start = time.perf_counter()
        if split:
            self.connector.observe_load_start(t_start - t_submit)
        ctx = (
            torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        )
        landing = None
        with ctx:
            if self.layered:
                landing = self.connector.load_layered(keys, tenant, block_ids)
            if landing is None:
                n = self.connector.load(keys, tenant, block_ids, deadline)
                if self.stream is not None:
                    # the blocks must be in device memory before any forward pass reads them
                    self.stream.synchronize()
        done = time.perf_counter()
        self.timings.append(
            LoadTiming(t_start - t_submit, done - t_start, landing is not None, len(keys))
        )
        return LoadResult(len(keys), landing) if landing is not None else LoadResult(n)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
