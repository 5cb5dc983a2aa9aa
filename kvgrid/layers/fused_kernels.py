"""Triton kernels of kvgrid.layers.fused_ops (imported on first GPU use, so a CPU-only run
never imports triton and tests can switch on the interpreter before these are defined)."""

from __future__ import annotations

import triton
import triton.language as tl

from kvgrid.layers.pdl_kernels import pdl_start


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,  # read (HAS_RES) and overwritten with x + residual
    w_ptr,
    out_ptr,
    stride_x,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        # round the sum to the activation dtype, as the unfused add does
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_r + cols, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    y = (xf * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_out_ptr,
    k_out_ptr,
    cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cb,
    stride_ckv,
    stride_ct,
    stride_ch,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KH: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    WRITE_CACHE: tl.constexpr,
    PDL: tl.constexpr,  # launched with programmatic dependent launch (layers/pdl.py)
):
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF
    # rotate-half tables repeat over both halves: the first half holds every angle
    c = tl.load(cos_ptr + pos * stride_cos + j, mask=jmask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cos + j, mask=jmask, other=0.0).to(tl.float32)
    c = c[None, :]
    s = s[None, :]

    h = tl.arange(0, BLOCK_H)[:, None]
    m = (h < NUM_HEADS) & jmask[None, :]
    qp = q_ptr + t * stride_qt + h * stride_qh + j[None, :]
    q1 = tl.load(qp, mask=m, other=0.0).to(tl.float32)
    q2 = tl.load(qp + HALF, mask=m, other=0.0).to(tl.float32)
    qo = q_out_ptr + t * stride_qot + h * stride_qoh + j[None, :]
    tl.store(qo, (q1 * c - q2 * s).to(q_out_ptr.dtype.element_ty), mask=m)
    tl.store(qo + HALF, (q2 * c + q1 * s).to(q_out_ptr.dtype.element_ty), mask=m)

    kh = tl.arange(0, BLOCK_KH)[:, None]
    km = (kh < NUM_KV_HEADS) & jmask[None, :]
    kp = k_ptr + t * stride_kt + kh * stride_kh + j[None, :]
    k1 = tl.load(kp, mask=km, other=0.0).to(tl.float32)
    k2 = tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32)
    r1 = (k1 * c - k2 * s).to(k_out_ptr.dtype.element_ty)
    r2 = (k2 * c + k1 * s).to(k_out_ptr.dtype.element_ty)
    ko = k_out_ptr + t * stride_kot + kh * stride_koh + j[None, :]
    tl.store(ko, r1, mask=km)
    tl.store(ko + HALF, r2, mask=km)
    if WRITE_CACHE:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # padding rows of CUDA-graph buckets write nothing
            blk = slot // BLOCK_SIZE
            off = slot % BLOCK_SIZE
            dst = cache_ptr + blk * stride_cb + off * stride_ct + kh * stride_ch + j[None, :]
            cty = cache_ptr.dtype.element_ty
            tl.store(dst, r1.to(cty), mask=km)
            tl.store(dst + HALF, r2.to(cty), mask=km)
            vp = v_ptr + t * stride_vt + kh * stride_vh + j[None, :]
            v1 = tl.load(vp, mask=km, other=0.0)
            v2 = tl.load(vp + HALF, mask=km, other=0.0)
            tl.store(dst + stride_ckv, v1.to(cty), mask=km)
            tl.store(dst + stride_ckv + HALF, v2.to(cty), mask=km)


@triton.jit
def _silu_mul_kernel(
    x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
