"""Write-back copies G1 -> G2: scattered blocks in one kernel launch (on the CPU under
Triton's interpreter), against the plain path of one copy per run of adjacent blocks."""

from __future__ import annotations

import pytest
import torch

from tests.support import triton_interp

triton_interp.setup()
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kvgrid.store import landing_kernel  # noqa: E402
from kvgrid.store.transfer import CudaCopier, copy_run, split_runs  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _slabs(dtype: torch.dtype, n_src: int = 10, n_dst: int = 6):
    g = torch.Generator().manual_seed(3)
    src = (torch.rand((n_src, 2, 3, 40), generator=g) * 200).to(dtype)
    return src, torch.zeros((n_dst, 2, 3, 40), dtype=dtype)


def test_runs_are_counted_as_copy_run_merges_them(monkeypatch):
    src, dst = _slabs(torch.float32)
    issued = []
    real = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda d, s, **kw: issued.append(1) or real(d, s))
    for order in ([0, 1, 2, 3], [4, 0, 7, 2], [0, 1, 5, 6, 9]):
        pairs = [(dst[i], src[s]) for i, s in enumerate(order)]
        issued.clear()
        run: list = []
        for d, s in pairs:
            run = copy_run(run, s, d)
        copy_run(run, None, None)
        assert len(split_runs(pairs)) == len(issued), order
        assert torch.equal(dst[: len(order)], src[order])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_one_launch_copies_scattered_blocks_bit_for_bit(dtype):
    src, dst = _slabs(dtype)
    if torch.cuda.is_available():  # as in a write-back: G1 on the GPU, G2 pinned
        src, dst = src.cuda(), dst.pin_memory()
    order, slots = [7, 0, 9, 3], [5, 1, 2, 0]
    assert landing_kernel.copy_blocks([(dst[d], src[s]) for s, d in zip(order, slots)], src.device)
    if src.is_cuda:
        torch.cuda.synchronize()
    for s, d in zip(order, slots):
        assert torch.equal(dst[d], src[s].cpu())
    assert not dst[[3, 4]].any()  # nothing else written


def test_blocks_of_other_sizes_or_layouts_are_left_to_the_plain_path():
    src, dst = _slabs(torch.float32)
    assert not landing_kernel.copy_blocks([(dst[0], src[0]), (dst[1, :1], src[1, :1])], dst.device)
    assert not landing_kernel.copy_blocks([(dst[0].transpose(0, 1), src[0])], dst.device)
    assert not dst.any()


@cuda
def test_the_copier_copies_many_scattered_blocks_in_one_launch(monkeypatch):
    src = _slabs(torch.bfloat16, 64)[0].cuda()
    dst = torch.zeros((16, *src.shape[1:]), dtype=src.dtype, pin_memory=True)
    launches = []
    real = landing_kernel.copy_blocks
    monkeypatch.setattr(landing_kernel, "copy_blocks", lambda *a: launches.append(1) or real(*a))
    copier = CudaCopier()
    copier.kernel_min_runs = 4
    order = [int(i) for i in torch.randperm(64)[:16]]
    copier.copy([(dst[i], src[s]) for i, s in enumerate(order)]).synchronize()
    assert launches == [1] and torch.equal(dst, src[order].cpu())
    copier.copy([(dst[i], src[i]) for i in range(8)]).synchronize()  # one run: the copy engine
    assert launches == [1] and torch.equal(dst[:8], src[:8].cpu())
