"""Copies between G1 (the engine's KV cache) and G2 slots, in both directions.

Write-back (G1 -> G2) of blocks that leave G1 runs on one side stream per device
(``CudaCopier``): it first waits for the engine's stream (so it reads the KV after the
forward that wrote it), copies every block of one ``save()`` without blocking, and records
one event; the engine's stream then waits for that event on the device, so no later kernel
overwrites those G1 blocks before they are read, and the engine thread never waits for the
copy. The G2 slots carry the event (``Slot.ready``) until it has fired: whoever reads them
first calls ``wait_ready``. On the CPU there is no side stream and copies stay synchronous.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

import numpy as np
import torch

# Separate copies from which one kernel launch beats a copy-engine call per copy. On an H200
# the launch costs the engine's thread 0.1-0.3 ms up to 64 blocks (1 ms at 256), copy-engine
# calls 6-8 us a copy, and the kernel lands 5-10% slower (``kvgrid.bench.gpu.writeback_copy``).
KERNEL_MIN_RUNS = 32


class CopyEvent(Protocol):
    """What a pending G2 slot waits on (a ``torch.cuda.Event``; a fake one in CPU tests)."""

    def synchronize(self) -> None: ...


class Copier(Protocol):
    """Issues the G1 -> G2 copies of one ``save()`` and returns the event that fires once
    they have landed; the caller's further device work is already ordered after them."""

    def accepts(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        """Whether it copies ``src`` into ``dst`` asynchronously (else the caller copies)."""

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> CopyEvent: ...

    def idle(self, device: torch.device) -> bool:
        """Whether every copy issued on ``device`` has finished (nothing to fence on)."""

    def fence(self, device: torch.device, ptrs: Iterable[int] | None = None) -> None:
        """Order the current stream of ``device`` after the copies issued so far that read
        the blocks at addresses ``ptrs`` (every copy issued so far when None)."""

    def synchronize(self, device: torch.device) -> None:
        """Wait on the host for every copy issued on ``device``."""


class StreamWaits:
    """How long CUDA streams stall at the store's cross-stream waits (write-back copies,
    landings): an event on the waiting stream before and after each wait, read once they
    have fired. Opt-in (a bench sets ``transfer.STREAM_WAITS``): serving pays one global
    read per wait and records nothing."""

    def __init__(self) -> None:
        self.tag = 0  # the caller's label for waits recorded from now on (a step number)
        self._pending: list[tuple[int, str, torch.cuda.Event, torch.cuda.Event]] = []

    def wait(self, stream: torch.cuda.Stream, event: torch.cuda.Event, kind: str) -> None:
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record(stream)
        stream.wait_event(event)
        after.record(stream)
        self._pending.append((self.tag, kind, before, after))

    def take(self) -> list[tuple[int, str, float]]:
        """(tag, kind, milliseconds stalled) of every wait recorded since the last call;
        waits on the host for their events."""
        out, self._pending = self._pending, []
        res = []
        for tag, kind, before, after in out:
            after.synchronize()
            res.append((tag, kind, before.elapsed_time(after)))
        return res


STREAM_WAITS: StreamWaits | None = None


def stream_wait(stream: torch.cuda.Stream, event: torch.cuda.Event, kind: str) -> None:
    """``stream.wait_event(event)``, timed under a bench's ``STREAM_WAITS`` (never while a
    CUDA graph is captured: timing events cannot be recorded into one)."""
    probe = STREAM_WAITS
    if probe is None or torch.cuda.is_current_stream_capturing():
        stream.wait_event(event)
    else:
        probe.wait(stream, event, kind)


def wait_ready(slots: Iterable, device: torch.device | None = None) -> None:
    """Make what follows see the bytes of ``slots`` (committed G2 slots, pinned by the
    caller): device work on the current stream of a CUDA ``device`` waits for their pending
    copies (no host wait); any other reader waits on the host. Raises if a copy failed."""
    seen: set[int] = set()
    for s in slots:
        ev = s.ready  # cleared (None) only after the copy is known to have landed
        if ev is None or id(ev) in seen:
            continue
        seen.add(id(ev))
        if device is not None and device.type == "cuda":
            stream_wait(torch.cuda.current_stream(device), ev, "slot_ready")
        else:
            ev.synchronize()


class CudaCopier:
    """Asynchronous device -> pinned host copies on one side stream per device."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        # the writers of the sources fence themselves (``fence`` with the blocks they are
        # about to overwrite): the current stream then need not wait for every copy
        self.writers_fence = False
        self._last: dict[torch.device, torch.cuda.Event] = {}
        self._read = ReadEvents()  # per source block: the event of its latest copy
        self._lock = threading.Lock()
        # From this many separate runs up, a hand-down's blocks go in one kernel launch
        # rather than one copy-engine call per run (see landing_kernel.copy_blocks).
        self.kernel_min_runs = KERNEL_MIN_RUNS

    @staticmethod
    def _kernel_copy(pairs: list[tuple[torch.Tensor, torch.Tensor]], dev: torch.device) -> bool:
        from kvgrid.store import landing_kernel

        return landing_kernel.copy_blocks(pairs, dev)

    def accepts(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        # a device -> pageable host copy is synchronous whatever it is asked to be
        return src.is_cuda and dst.is_pinned()

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.cuda.Event:
        """``dst.copy_(src)`` for each (pinned host dst, device src) pair, asynchronously."""
        dev = pairs[0][1].device
        with self._lock:
            stream = self._streams.get(dev)
            if stream is None:
                stream = self._streams[dev] = torch.cuda.Stream(dev)
        cur = torch.cuda.current_stream(dev)
        stream.wait_stream(cur)  # read the KV only after the work that wrote it
        with torch.cuda.stream(stream):
            runs = split_runs(pairs)
            if len(runs) < self.kernel_min_runs or not self._kernel_copy(pairs, dev):
                for run in runs:
                    issue_run(run, True)  # accepts(): device -> pinned host
        ev = torch.cuda.Event()
        ev.record(stream)
        # No later kernel of the engine's stream may overwrite the blocks before they are
        # read. This also covers the caching allocator: a source freed to this stream is
        # reused only by work ordered after the event, so no record_stream is needed.
        # Unless the writers fence: an engine's forward then waits only when it writes a
        # block still being read, not at every write-back (its sources are its own cache)
        if not self.writers_fence:
            stream_wait(cur, ev, "writeback")
        with self._lock:
            self._last[dev] = ev
            self._read.note(dev, (src.data_ptr() for _, src in pairs), ev)
        return ev

    def synchronize(self, device: torch.device) -> None:
        """Wait on the host until every copy issued on ``device`` has finished."""
        with self._lock:
            stream = self._streams.get(device)
        if stream is not None:
            stream.synchronize()

    def idle(self, device: torch.device) -> bool:
        """Whether every copy issued on ``device`` has finished (nothing to fence on)."""
        with self._lock:
            ev = self._last.get(device)
        return ev is None or ev.query()

    def fence(self, device: torch.device, ptrs: Iterable[int] | None = None) -> None:
        """Order the current stream's further work after the write-backs that read the
        blocks at ``ptrs`` (after every write-back issued so far when None). Loads into G1
        call this: the blocks they overwrite may have just been evicted, and a load runs on
        its own stream, which the engine's wait does not cover. Only those blocks' copies:
        write-backs issued later (other admissions of the step) need not delay the load."""
        with self._lock:
            ev = self._last.get(device) if ptrs is None else self._read.latest(device, ptrs)
        if ev is not None:
            stream_wait(torch.cuda.current_stream(device), ev, "fence")


class ReadEvents:
    """Per source address, the event of the latest copy that read it. A copier's copies run
    in order on one stream, so of several blocks the latest-issued event covers them all."""

    _PRUNE_AT = 8192  # engine blocks are few; other sources (tests, tools) come and go

    def __init__(self) -> None:
        self._by_ptr: dict[torch.device, dict[int, tuple[int, object]]] = {}
        self._seq = 0

    def note(self, device: torch.device, ptrs: Iterable[int], event) -> None:
        self._seq += 1
        m = self._by_ptr.setdefault(device, {})
        for p in ptrs:
            m[p] = (self._seq, event)
        if len(m) > self._PRUNE_AT:
            for p in [p for p, (_, ev) in m.items() if ev.query()]:
                del m[p]

    def latest(self, device: torch.device, ptrs: Iterable[int]):
        """The latest-issued event among copies that read ``ptrs`` (None: none did)."""
        m = self._by_ptr.get(device, {})
        best = max((m[p] for p in ptrs if p in m), default=None, key=lambda x: x[0])
        return None if best is None else best[1]


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between contiguous host tensors of one dtype and shape, through
    numpy: one memcpy that releases the GIL. torch's CPU copy_ splits a large copy over its
    intra-op threads, and from a dozen loader threads at once that oversubscribes the CPUs
    (measured on 2 busy cores: 1 GB/s for an 8 MiB block, against 17-35 GB/s this way)."""
    if (
        dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.shape == src.shape
        and dst.is_contiguous()
        and src.is_contiguous()
    ):
        np.copyto(_bytes(dst), _bytes(src))
    else:
        dst.copy_(src)


def _bytes(t: torch.Tensor) -> np.ndarray:
    return t.reshape(-1).view(torch.uint8).numpy()


def split_runs(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list]:
    """The (dst, src) pairs as runs of (src, dst) adjacent on both sides: the copies
    ``copy_run`` would issue for them, one per run."""
    runs: list[list] = []
    for dst, src in pairs:
        if runs and _follows(src, dst, *runs[-1][-1]):
            runs[-1].append((src, dst))
        else:
            runs.append([(src, dst)])
    return runs


def copy_run(
    run: list,
    src: torch.Tensor | None,
    dst: torch.Tensor | None,
    non_blocking: bool | None = None,
) -> list:
    """Queue the copy ``src -> dst``, merging it into one copy with the queued ones while
    both sides stay adjacent in memory (G2 slots and G1 blocks are often handed out in
    order, so a prefix of hundreds of blocks goes in a few copies, not one per block).
    ``src=None`` flushes. Copies between a GPU and pinned host memory are asynchronous
    (``non_blocking``: the caller knows which it is; asking the driver costs a call per
    copy)."""
    if run and src is not None and _follows(src, dst, *run[-1]):
        run.append((src, dst))
        return run
    if run:
        issue_run(run, non_blocking)
    return [] if src is None else [(src, dst)]


def issue_run(run: list, non_blocking: bool | None = None) -> None:
    """One copy for a run of (src, dst) pairs adjacent on both sides (``copy_run``)."""
    s0, d0 = run[0]
    k = len(run)
    if non_blocking is None:
        non_blocking = (d0.is_cuda and s0.is_pinned()) or (s0.is_cuda and d0.is_pinned())
    if k == 1:
        d0.copy_(s0, non_blocking=non_blocking)
    else:
        big_s = s0.as_strided((k, *s0.shape), (s0.numel(), *s0.stride()))
        big_d = d0.as_strided((k, *d0.shape), (d0.numel(), *d0.stride()))
        big_d.copy_(big_s, non_blocking=non_blocking)


def _follows(src: torch.Tensor, dst: torch.Tensor, ps: torch.Tensor, pd: torch.Tensor) -> bool:
    """Whether the copy ``src -> dst`` continues the copy ``ps -> pd`` in memory."""
    return (
        src.data_ptr() == ps.data_ptr() + ps.nbytes
        and dst.data_ptr() == pd.data_ptr() + pd.nbytes
        and _same_storage(src, ps)
        and _same_storage(dst, pd)
    )


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
