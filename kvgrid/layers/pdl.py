"""Programmatic dependent launch (Hopper and later) for the decode step's Triton kernels.

A batch-1 decode step of a 32-layer model is ~260 kernels back to back in one CUDA graph;
the GPU-side cost of starting each after the previous one drains is paid every time (an
empty kernel costs 0.7 us in a graph on an H200, kvgrid.bench.gpu.decode_attn). On an H200 PDL
takes that graph from 3.94 to 3.81 ms (docs/benchmarks.md). Launched with PDL, a kernel's
blocks are scheduled as soon as every block of the kernel before it has started, then wait
at ``griddepcontrol.wait`` until that kernel has finished and its writes are visible:
the launch overlaps the previous kernel instead of following it.

Every kernel that takes ``PDL`` waits before its first global read or write, so it never
sees a predecessor's partial output nor overwrites what a predecessor still reads (a
graph's memory pool reuses buffers). ``KVGRID_PDL=0`` switches it off.
"""

from __future__ import annotations

import functools

import torch

from kvgrid import envs

ENABLED = envs.KVGRID_PDL.get()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL (a CUDA tensor on sm_90+)."""
    if not (ENABLED and t.is_cuda):
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def launch_kwargs(t: torch.Tensor) -> dict:
    """Kernel launch arguments: the kernel's ``PDL`` constexpr and Triton's launch option."""
    on = use_pdl(t)
    return {"PDL": on, "launch_pdl": on} if on else {"PDL": False}
