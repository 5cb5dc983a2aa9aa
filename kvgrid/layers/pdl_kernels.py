"""The device side of programmatic dependent launch (layers/pdl.py), shared by every kernel
that takes a ``PDL`` flag (imported with triton, so a CPU-only run never loads it)."""

import triton
import triton.language as tl


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """Call first, before any global read or write: wait until the kernel before has finished
    and its writes are visible, then let the kernel after launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
