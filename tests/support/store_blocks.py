"""Blocks, keys and a key ring shared by the store's tests: a small bf16 block shape, one
tenant's scope, and chains of block keys under it."""

from __future__ import annotations

import os

import torch

from kvgrid import keys
from kvgrid.store.crypto import KeyRing

SCOPE = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
KR = KeyRing({1: os.urandom(32)})
SHAPE = (2, 2, 16, 2, 8)
BLOCK_BYTES = 2 * 2 * 16 * 2 * 8 * 2


def block(seed: int) -> torch.Tensor:
    """A random bf16 block, the same for the same seed."""
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
