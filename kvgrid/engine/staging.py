"""Pinned host buffers reused across steps, for the small per-step copies to and from the GPU.

A fresh pinned allocation and staging copy per step (``tensor.pin_memory()``) is host work
on the critical path, and each time the caching allocator has to grow it makes a driver call
of unpredictable cost. A ring of buffers sized once at start avoids both; a slot is reused
only after the copy that last read or wrote it has finished.
"""

from __future__ import annotations

import numpy as np
import torch


class PinnedRing:
    """``depth`` pinned byte buffers of ``nbytes`` each, handed out in turn."""

    def __init__(self, nbytes: int, depth: int = 4):
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        self.events: list[torch.cuda.Event | None] = [None] * depth
        self.next = 0

    def _slot(self, nbytes: int) -> int | None:
        i = self.next
        if nbytes > self.bufs[i].numel():
            return None
        self.next = (i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()  # its last copy (``depth`` uses ago) is done
            self.events[i] = None
        return i

    def _record(self, i: int) -> None:
        ev = torch.cuda.Event()
        ev.record()
        self.events[i] = ev

    def to_device(self, a: np.ndarray, device: torch.device) -> torch.Tensor:
        """``a`` on ``device``, copied asynchronously from a ring slot."""
        src = torch.from_numpy(np.ascontiguousarray(a))
        i = self._slot(src.nbytes)
        if i is None:  # larger than sized for: an ordinary pinned copy
            return src.pin_memory().to(device, non_blocking=True)
        host = self.bufs[i][: src.nbytes].view(src.dtype).view(src.shape)
        host.numpy()[...] = a  # one memcpy (torch's CPU copy_ would fan out over threads)
        out = host.to(device, non_blocking=True)
        self._record(i)
        return out

    def from_device(self, t: torch.Tensor) -> torch.Tensor:
        """A pinned host tensor that ``t`` is being copied into; valid once the current
        stream has passed this point (wait on an event recorded after this call)."""
        nbytes = t.numel() * t.element_size()
        i = self._slot(nbytes)
        if i is None:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        else:
            host = self.bufs[i][:nbytes].view(t.dtype).view(t.shape)
        host.copy_(t, non_blocking=True)
        if i is not None:
            self._record(i)
        return host
