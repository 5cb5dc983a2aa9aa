"""Fused elementwise steps of the decoder layer: residual add + RMSNorm, RoPE + KV write, SiLU·mul.

Unfused, a Llama layer launches about 35 small kernels (float32 casts, squares, means,
``torch.cat`` for the rotation, separate K/V scatters...). At batch 1 each of those costs
a few microseconds on the GPU, which adds up to milliseconds per token; in a long prefill
they make several extra passes over [tokens, hidden] tensors. Each op here reads its inputs
once and writes its outputs once.

Every op has a plain-torch reference (``*_ref``): the CPU path runs it, so CPU results are
unchanged, and the Triton kernels are tested against it (tests/layers/test_fused_ops.py). The
Triton path is taken for CUDA tensors; ``force_triton`` lets the tests run the kernels
under Triton's interpreter on the CPU.

Rounding follows the reference: the residual sum is rounded to the activation dtype before
it is normalised, the normalised value is rounded before the weight multiplies it. RoPE
and SiLU·mul compute in float32 and round once (the reference rounds after each multiply).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvgrid.layers import pdl

# tests set this to run the Triton kernels on CPU tensors (TRITON_INTERPRET=1)
force_triton = False


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or force_triton


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _k():
    from kvgrid.layers import fused_kernels

    return fused_kernels


# ---- residual add + RMSNorm ------------------------------------------------------------------


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # normalise in float32 and scale after casting back, as transformers does, so bf16
    # results round the same way
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    return rms_norm_ref(x, weight, eps), x


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual) * weight, x + residual)``; without a residual, ``(norm(x), x)``.

    On the Triton path ``residual`` is updated in place (it becomes the returned sum).
    """
    if not use_triton(x) or x.dim() != 2 or weight.dtype != x.dtype:
        return add_rms_norm_ref(x, residual, weight, eps)
    n_rows, n_cols = x.shape
    assert x.stride(-1) == 1
    out = torch.empty_like(x)
    if residual is None:
        res, has_res = x, False
    else:
        assert residual.shape == x.shape and residual.stride(-1) == 1
        res, has_res = residual, True
    if n_rows:
        block = _pow2(n_cols)
        _k()._add_rms_norm_kernel[(n_rows,)](
            x,
            res,
            weight,
            out,
            x.stride(0),
            res.stride(0),
            out.stride(0),
            n_cols,
            eps,
            HAS_RES=has_res,
            BLOCK=block,
            num_warps=max(1, min(16, block // 512)),
            **pdl.launch_kwargs(x),
        )
    return out, res


# ---- RoPE (rotate-half layout) + KV cache write --------------------------------------------


def rope_ref(
    positions: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotate ``x`` [T, heads, d] by the tables ``cos``/``sin`` [max_pos, d] (both halves equal)."""
    c = cos[positions].unsqueeze(1).to(x.dtype)
    s = sin[positions].unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat([-x2, x1], dim=-1) * s


def write_kv_reference(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, layer: int, slots: torch.Tensor
) -> None:
    """Scatter new K/V into their slots (the plain path fused kernels are checked against)."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, layer, 0, offsets] = k.to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = v.to(kv_cache.dtype)


def rope_kv_write(
    positions: torch.Tensor,
    q: torch.Tensor,  # [T, H, D], last dim contiguous (a view of the fused qkv output is fine)
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    cos: torch.Tensor,  # [max_pos, D] float32
    sin: torch.Tensor,
    layer_cache: torch.Tensor | None,  # kv_cache[:, layer]: [blocks, 2, block_size, KVH, D]
    slots: torch.Tensor | None,  # [T] int64; negative: no write
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated ``(q, k)`` as new contiguous tensors; with a cache, rotated K and V are stored
    at ``slots`` in the same pass (the attention backend must then skip its own write)."""
    if not use_triton(q):
        q_r, k_r = rope_ref(positions, q, cos, sin), rope_ref(positions, k, cos, sin)
        if layer_cache is not None:
            write_kv_reference(k_r, v, layer_cache.unsqueeze(1), 0, slots)
        return q_r, k_r
    t, h, d = q.shape
    kvh = k.shape[1]
    assert d % 2 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    q_out = torch.empty(t, h, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(t, kvh, d, dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    write = layer_cache is not None
    lc = layer_cache if write else k_out
    cs = [lc.stride(i) for i in range(4)] if write else [0, 0, 0, 0]
    _k()._rope_kv_kernel[(t,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        q_out,
        k_out,
        lc,
        slots if write else positions,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        q_out.stride(0),
        q_out.stride(1),
        k_out.stride(0),
        k_out.stride(1),
        *cs,
        NUM_HEADS=h,
        NUM_KV_HEADS=kvh,
        HALF=d // 2,
        BLOCK_H=_pow2(h),
        BLOCK_KH=_pow2(kvh),
        BLOCK_HALF=_pow2(d // 2),
        BLOCK_SIZE=layer_cache.shape[2] if write else 1,
        WRITE_CACHE=write,
        num_warps=4,
        **pdl.launch_kwargs(q),
    )
    return q_out, k_out


# ---- SiLU(gate) * up ------------------------------------------------------------------------


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim: [T, 2I] -> [T, I]."""
    if not use_triton(gate_up) or gate_up.dim() != 2:
        return silu_mul_ref(gate_up)
    t, two_i = gate_up.shape
    n = two_i // 2
    assert gate_up.stride(-1) == 1
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    if t:
        block = min(2048, _pow2(n))
        _k()._silu_mul_kernel[(t, -(-n // block))](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            n,
            BLOCK=block,
            num_warps=4,
            **pdl.launch_kwargs(gate_up),
        )
    return out


__all__ = [
    "add_rms_norm",
    "add_rms_norm_ref",
    "rms_norm_ref",
    "rope_kv_write",
    "rope_ref",
    "silu_mul",
    "silu_mul_ref",
    "write_kv_reference",
]
