"""Fused decoder-layer ops (Triton) against their plain-torch references, on random inputs.

Without a GPU the kernels run under Triton's interpreter in float32 (see
tests/layers/test_attention.py for why only float32 there); on a GPU in bfloat16 as well.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kvgrid.layers import fused_ops as fo
from kvgrid.models.config import ModelConfig
from kvgrid.models.llama import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# float32: only summation order differs; bf16: one rounding of the output (2^-8) apart
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _kernels_on_cpu(monkeypatch):
    monkeypatch.setattr(fo, "force_triton", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def rand(gen, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 200), (3, 4096)])
def test_add_rms_norm(dtype, rows, cols):
    gen = torch.Generator().manual_seed(rows * cols)
    x, res = rand(gen, rows, cols, dtype=dtype), rand(gen, rows, cols, dtype=dtype, scale=3.0)
    w = rand(gen, cols, dtype=dtype)
    ref_out, ref_sum = fo.add_rms_norm_ref(x, res, w, 1e-5)
    res_in = res.clone()
    out, new_res = fo.add_rms_norm(x, res_in, w, 1e-5)
    assert new_res.data_ptr() == res_in.data_ptr(), "the residual is updated in place"
    assert torch.equal(new_res, ref_sum), "the residual sum rounds like the unfused add"
    assert rel_err(out, ref_out) < TOL[dtype]
    # no residual: a plain norm, and x itself is handed back as the residual
    out, same = fo.add_rms_norm(x, None, w, 1e-5)
    assert same is x
    assert rel_err(out, fo.rms_norm_ref(x, w, 1e-5)) < TOL[dtype]


def _rope_tables(head_dim: int, max_pos: int, scaled: bool):
    cfg = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=16,
        hidden_size=4 * head_dim,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_theta=500000.0,
        rope_scaling=(
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
            if scaled
            else None
        ),
    )
    rope = RotaryEmbedding(cfg, max_pos)
    return rope.cos.to(DEVICE), rope.sin.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,head_dim,scaled", [(4, 2, 16, False), (8, 1, 128, True)])
def test_rope_kv_write(dtype, heads, kv_heads, head_dim, scaled):
    gen = torch.Generator().manual_seed(heads + head_dim)
    t, block_size, num_blocks = 7, 4, 6
    cos, sin = _rope_tables(head_dim, 512, scaled)
    # q/k/v as strided views of one fused projection output, as the model hands them over
    qkv = rand(gen, t, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(t, heads, head_dim)
    k = k.view(t, kv_heads, head_dim)
    v = v.view(t, kv_heads, head_dim)
    positions = torch.tensor([0, 1, 63, 64, 200, 511, 7], device=DEVICE)
    slots = torch.tensor([3, 0, 17, -1, 9, 23, 12], device=DEVICE)  # -1: padding, no write
    kv = torch.full((num_blocks, 2, 2, block_size, kv_heads, head_dim), float("nan"))
    kv = kv.to(DEVICE, dtype)
    ref_kv = kv.clone()

    q_ref, k_ref = fo.rope_ref(positions, q, cos, sin), fo.rope_ref(positions, k, cos, sin)
    keep = slots >= 0
    fo.write_kv_reference(k_ref[keep], v[keep], ref_kv, 1, slots[keep])
    q_out, k_out = fo.rope_kv_write(positions, q, k, v, cos, sin, kv[:, 1], slots)
    assert rel_err(q_out, q_ref) < TOL[dtype]
    assert rel_err(k_out, k_ref) < TOL[dtype]
    # exactly the slots named were written (the rest is still NaN), V bit for bit
    assert torch.equal(kv.isnan(), ref_kv.isnan())
    written = ~ref_kv.isnan()
    assert rel_err(kv[written], ref_kv[written]) < TOL[dtype]
    assert torch.equal(kv[:, 1, 1][~kv[:, 1, 1].isnan()], ref_kv[:, 1, 1][written[:, 1, 1]])
    # without a cache: rotation only
    q2, k2 = fo.rope_kv_write(positions, q, k, v, cos, sin, None, None)
    assert torch.equal(q2, q_out) and torch.equal(k2, k_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 48), (6, 300), (2, 5000)])
def test_silu_mul(dtype, rows, inter):
    gen = torch.Generator().manual_seed(rows + inter)
    gate_up = rand(gen, rows, 2 * inter, dtype=dtype, scale=4.0)
    out = fo.silu_mul(gate_up)
    assert out.shape == (rows, inter)
    assert rel_err(out, fo.silu_mul_ref(gate_up)) < TOL[dtype]


def test_cpu_tensors_take_the_reference_path(monkeypatch):
    monkeypatch.setattr(fo, "force_triton", False)
    x = torch.randn(3, 32)
    assert fo.use_triton(x) is x.is_cuda
    out = fo.silu_mul(torch.cat([x, x], dim=-1))
    assert torch.equal(out, fo.silu_mul_ref(torch.cat([x, x], dim=-1)))
