"""The grammar-mask kernel (kvgrid.layers.token_mask_kernels) against the torch reference.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors; on a GPU also at
batch 64 and a 128K-token vocabulary, through ``apply_token_bitmask``'s CUDA path.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import triton_interp

triton_interp.setup()
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kvgrid.engine.guided import apply_token_bitmask, apply_token_bitmask_reference  # noqa: E402
from kvgrid.layers.token_mask_kernels import mask_logits  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter builds no bfloat16 constants: bfloat16 logits on a GPU only
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def case(batch: int, vocab: int, seed: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, vocab, generator=g).to(dtype)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), generator=g, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32)
    bitmask[0] = -1  # a row that allows every token
    bitmask[-1] = 0  # and one that allows none
    return logits, bitmask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "vocab", [4099, 8192]
)  # a vocabulary that ends inside a word, and one that does not
def test_kernel_refuses_exactly_the_tokens_the_reference_does(dtype, vocab):
    logits, bitmask = case(5, vocab, 0, dtype)
    want = logits.clone()
    apply_token_bitmask_reference(want, None, bitmask)
    got = logits.to(DEVICE)
    mask_logits(got, None, bitmask.to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert torch.isinf(want[-1]).all() and not torch.isinf(want[0]).any()


def test_kernel_masks_only_the_given_rows():
    logits, bitmask = case(6, 4099, 1, torch.float32)
    rows = torch.tensor([4, 1, 3], dtype=torch.int64)
    want = logits.clone()
    apply_token_bitmask_reference(want, rows, bitmask[:3])
    got = logits.to(DEVICE)
    mask_logits(got, rows.to(DEVICE), bitmask[:3].to(DEVICE))
    assert torch.equal(got.cpu(), want)
    assert torch.equal(got.cpu()[[0, 2, 5]], logits[[0, 2, 5]])  # rows not named: untouched


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_cuda_path_at_batch_64_and_128k_tokens():
    logits, bitmask = case(64, 128256, 2, torch.float32)
    want = logits.clone()
    apply_token_bitmask_reference(want, None, bitmask)
    got = logits.cuda()
    apply_token_bitmask(got, None, bitmask.cuda())
    assert torch.equal(got.cpu(), want)
