"""The sampler's chunked argmax (the GPU path for a few rows) against torch.argmax."""

from __future__ import annotations

import pytest
import torch

from kvgrid.engine import sampler


@pytest.fixture
def chunked(monkeypatch):
    monkeypatch.setattr(sampler, "_force_chunked_argmax", True)


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_chunked_argmax_matches_torch(chunked, rows):
    g = torch.Generator().manual_seed(rows)
    logits = torch.randn(rows, 128256, generator=g)
    assert torch.equal(sampler.argmax_rows(logits), logits.argmax(dim=-1))


def test_chunked_argmax_takes_the_first_of_equal_maxima(chunked):
    logits = torch.zeros(3, 4096)
    logits[0, [4095, 7, 2048]] = 5.0  # in the last, first and middle chunks
    logits[1, [64, 63]] = 1.0  # adjacent chunks (width 64)
    logits[2] = -1.0  # every entry equal
    assert sampler.argmax_rows(logits).tolist() == [7, 63, 0]
    assert logits.argmax(dim=-1).tolist() == [7, 63, 0]


def test_argmax_falls_back_where_chunks_do_not_fit(chunked):
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 1009), (16, 4096)):  # a prime vocabulary; too many rows to gain
        logits = torch.randn(*shape, generator=g)
        assert torch.equal(sampler.argmax_rows(logits), logits.argmax(dim=-1))
