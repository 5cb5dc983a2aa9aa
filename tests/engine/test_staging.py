"""Pinned staging ring: what goes through it arrives intact, however the sizes vary."""

import numpy as np
import pytest
import torch

from kvgrid.engine.staging import PinnedRing

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_round_trips_through_a_reused_ring_stay_intact():
    dev = torch.device("cuda")
    ring_in, ring_out = PinnedRing(4096, depth=3), PinnedRing(4096, depth=2)
    rng = np.random.default_rng(0)
    sent, back = [], []
    for step in range(40):  # many more uses than slots, nothing synchronised in between
        n = int(rng.integers(1, 500))
        a = rng.integers(-(2**40), 2**40, n, dtype=np.int64)
        b = rng.integers(-(2**20), 2**20, (n // 7 + 1, 3), dtype=np.int32)
        da, db = ring_in.to_device(a, dev), ring_in.to_device(b, dev)
        torch.cuda._sleep(20_000)  # the device lags behind the host
        sent.append((a, b))
        back.append((ring_out.from_device(da * 3), db.cpu()))
        torch.cuda.current_stream().synchronize()
        assert np.array_equal(back[-1][0].numpy(), a * 3), step
        assert np.array_equal(back[-1][1].numpy(), b), step
    big = np.arange(1000, dtype=np.int64)  # larger than a slot: an ordinary pinned copy
    assert np.array_equal(ring_in.to_device(big, dev).cpu().numpy(), big)
    h = ring_out.from_device(torch.arange(1000, device=dev))
    torch.cuda.synchronize()
    assert np.array_equal(h.numpy(), big)
