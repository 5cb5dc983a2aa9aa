"""Layer-by-layer landing of stored blocks in G1: the forward over a loaded prefix starts while
the prefix is still crossing PCIe.

A stored block holds all its layers contiguously (the object contract), so copied a block
at a time, layer 0 of the last block lands only at the very end and the first layer of the
forward waits for the whole prefix. Copied layer-major instead, layer l of every block has
landed after (l+1)/L of the transfer, and layer l of the forward waits only for that (one
CUDA event per layer): time to first token becomes the transfer plus one layer's compute,
not the transfer plus the whole forward.

The copy engine cannot move one layer of many blocks in a few calls (each block-layer is a
separate piece of a strided host slot, and ``Tensor.copy_`` of a strided host source goes
through pageable staging), so a Triton kernel reads the pinned host slots directly (under
UVA, pinned host memory is addressable from the GPU) and writes the G1 blocks: one launch
per layer, whatever the number or placement of the blocks. The torch reference does the
same copies one by one (CPU tests; and the kernel's test oracle).
"""

from __future__ import annotations

import numpy as np
import torch

from kvgrid.store.transfer import stream_wait

_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16), (1, torch.int8))


class LayerLanding:
    """A load in flight: ``events[l]`` fires once layer l of every block has landed.

    Without events (CPU) the copies were done before this was made, and waits are no-ops."""

    def __init__(self, events: list | None, start=None, nbytes: int = 0) -> None:
        self.events = events
        self.start = start
        self.nbytes = nbytes

    @property
    def num_layers(self) -> int:
        return len(self.events) if self.events else 0

    def wait_layer(self, layer: int) -> None:
        """Make the current stream wait for ``layer`` (no host wait)."""
        if self.events:
            stream_wait(torch.cuda.current_stream(), self.events[layer], "landing")

    def wait_all(self) -> None:
        """Make the current stream wait for every layer (they land in order on one stream)."""
        if self.events:
            stream_wait(torch.cuda.current_stream(), self.events[-1], "landing")

    def landed(self) -> bool:
        """Whether every layer is in G1 already (asks the device; never waits)."""
        return not self.events or self.events[-1].query()

    def synchronize(self) -> None:
        if self.events:
            self.events[-1].synchronize()

    def device_seconds(self) -> float | None:
        """Time the copies took on the device (after ``synchronize``)."""
        if not self.events or self.start is None:
            return None
        return self.start.elapsed_time(self.events[-1]) / 1e3


def land_layers(
    src: torch.Tensor, src_idx: list[int], dst: torch.Tensor, dst_idx: list[int]
) -> LayerLanding:
    """Copy blocks ``src[src_idx[i]] -> dst[dst_idx[i]]`` layer-major on the current stream,
    with an event per layer. ``src`` and ``dst`` are contiguous slabs ``[n, layers, ...]`` of
    one block shape (a G2 pool and the G1 cache); ``src`` must be pinned when ``dst`` is on
    the GPU. The caller keeps the source blocks unchanged until the landing completes.
    Checked once per slab, not per block: a 32K-token prefix is 512 blocks, and per-block
    tensor calls would cost milliseconds before the first byte moves."""
    if len(src_idx) != len(dst_idx):
        raise ValueError(f"{len(src_idx)} sources for {len(dst_idx)} destinations")
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype or src.dim() < 2:
        raise ValueError(
            f"source blocks {tuple(src.shape[1:])} {src.dtype} do not match destination blocks "
            f"{tuple(dst.shape[1:])} {dst.dtype}"
        )
    if not (src.is_contiguous() and dst.is_contiguous()):
        raise ValueError("source and destination slabs must be contiguous")
    si, di = np.asarray(src_idx, np.int64), np.asarray(dst_idx, np.int64)
    if not (_in_range(si, src.shape[0]) and _in_range(di, dst.shape[0])):
        raise ValueError("block index out of range")
    nbytes = int(si.size) * dst[0].nbytes
    if not si.size:
        return LayerLanding(None)
    if not dst.is_cuda:
        st, dt = torch.from_numpy(si), torch.from_numpy(di)
        for layer in range(dst.shape[1]):
            dst[dt, layer] = src[st, layer]
        return LayerLanding(None, nbytes=nbytes)
    if not src.is_pinned():
        raise ValueError("sources of a GPU landing must be pinned host memory")
    return _land_triton(src, si, dst, di, nbytes)


def _in_range(idx: np.ndarray, n: int) -> bool:
    return not idx.size or (idx.min() >= 0 and idx.max() < n)


def _land_triton(
    src: torch.Tensor, si: np.ndarray, dst: torch.Tensor, di: np.ndarray, nbytes: int
) -> LayerLanding:
    from kvgrid.store import landing_kernel

    block_bytes, layer_bytes = dst[0].nbytes, dst[0, 0].nbytes
    n = si.size
    # the destinations' addresses start on 16 bytes, as the sources' do: the kernel is
    # compiled for that alignment once, not again for every odd number of blocks
    m = n + n % 2
    addrs = np.zeros(m + n, np.int64)
    addrs[:n] = src.data_ptr() + si * block_bytes
    addrs[m:] = dst.data_ptr() + di * block_bytes
    # the widest word that divides the layer and the slab addresses: 16-byte vector accesses
    word, wdtype = next(
        (w, t)
        for w, t in _WORDS
        if layer_bytes % w == 0 and block_bytes % w == 0
        and src.data_ptr() % w == 0 and dst.data_ptr() % w == 0
    )  # fmt: skip
    a = torch.from_numpy(addrs).pin_memory().to(dst.device, non_blocking=True)
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    events = []
    for layer in range(dst.shape[1]):
        landing_kernel.copy_layer(a[:n], a[m:], layer, layer_bytes // word, wdtype)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        events.append(ev)
    return LayerLanding(events, start, nbytes)
