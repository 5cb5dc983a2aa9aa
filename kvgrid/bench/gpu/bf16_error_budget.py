"""Where a bf16 forward's logits error comes from, on the benchmark's kind of weights (CPU).

The engine's logits target is 1e-2 (relative norm) from transformers'. On Llama-3-8B-shape random
weights, transformers' own bf16 logits are 1.7e-2 from float32 and 2.1e-2 between its two
attention paths (kvgrid.bench.gpu.engine, H200). This script shows why, on a narrower model of
the same depth (32 layers) and the same scale-preserving init as
``LlamaForCausalLM.init_dummy``: the float32 forward over bf16-representable weights, with
the output of one operation at a time rounded to bf16, and then all of them. Each rounding
site alone costs 2-7e-3; together they add up (in quadrature) to the bf16 floor, and even a
float32 residual stream leaves it above 1e-2.

    python -m kvgrid.bench.gpu.bf16_error_budget   # ~30 s on 2 cores; writes $OUT (./out)
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from kvgrid.bench.gpu import harness
from kvgrid.bench.gpu.harness import add_common_args

H, LAYERS, HEADS, KV_HEADS, D, INTER, VOCAB, T = 1024, 32, 8, 2, 128, 3584, 8000, 256
SITES = ("h", "qkv", "rope", "attn", "o", "res", "gu", "act", "down", "logits")


def build(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(n: int, k: int, scale: float = 1.0) -> torch.Tensor:
        # bf16-representable, as the engine's weights are: only activations are rounded
        return (torch.randn(n, k, generator=g) * k**-0.5 * scale).bfloat16().float()

    depth = (2 * LAYERS) ** -0.5  # residual-writing projections, as init_dummy
    layers = [
        dict(
            qkv=w((HEADS + 2 * KV_HEADS) * D, H),
            o=w(H, HEADS * D, depth),
            gu=w(2 * INTER, H),
            d=w(H, INTER, depth),
        )
        for _ in range(LAYERS)
    ]
    inv = 1.0 / (500000 ** (torch.arange(0, D, 2).float() / D))
    ang = torch.outer(torch.arange(T).float(), inv)
    return dict(
        emb=w(VOCAB, H),
        layers=layers,
        lm=w(VOCAB, H),
        ids=torch.randint(0, VOCAB, (T,), generator=g),
        cos=ang.cos()[:, None],
        sin=ang.sin()[:, None],
    )


def forward(m: dict, rounded: set[str]) -> torch.Tensor:
    """Float32 forward; the outputs of the operations in ``rounded`` go through bf16."""

    def r(t: torch.Tensor, site: str) -> torch.Tensor:
        return t.bfloat16().float() if site in rounded else t

    def rms(x: torch.Tensor) -> torch.Tensor:
        return r(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), "h")

    def rope(x: torch.Tensor) -> torch.Tensor:
        a, b = x[..., : D // 2], x[..., D // 2 :]
        c, s = m["cos"], m["sin"]
        return r(torch.cat([a * c - b * s, b * c + a * s], -1), "rope")

    x = m["emb"][m["ids"]]
    for lw in m["layers"]:
        q, k, v = r(rms(x) @ lw["qkv"].T, "qkv").split([HEADS * D, KV_HEADS * D, KV_HEADS * D], -1)
        q, k = rope(q.view(T, HEADS, D)), rope(k.view(T, KV_HEADS, D))
        k = k.repeat_interleave(HEADS // KV_HEADS, 1)
        v = v.view(T, KV_HEADS, D).repeat_interleave(HEADS // KV_HEADS, 1)
        a = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
        )
        a = r(a.transpose(0, 1).reshape(T, HEADS * D), "attn")
        x = r(x + r(a @ lw["o"].T, "o"), "res")
        gate, up = r(rms(x) @ lw["gu"].T, "gu").chunk(2, -1)
        x = r(x + r(r(F.silu(gate) * up, "act") @ lw["d"].T, "down"), "res")
    return r(rms(x) @ m["lm"].T, "logits")


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser("kvgrid.bench.gpu.bf16_error_budget", __doc__)
    add_common_args(ap)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    m = build()
    ref = forward(m, set())

    def err(rounded: set[str]) -> float:
        return float((forward(m, rounded) - ref).norm() / ref.norm())

    rows = {f"only {s}": err({s}) for s in SITES}
    rows["all (bf16 forward)"] = err(set(SITES))
    rows["all but the residual stream (float32 residual)"] = err(set(SITES) - {"res"})
    rows["quadrature sum of single sites but res"] = (
        sum(v**2 for k, v in rows.items() if k.startswith("only") and k != "only res") ** 0.5
    )
    shape = f"hidden {H}, {LAYERS} layers, {HEADS}/{KV_HEADS} heads, {T} tokens, vocab {VOCAB}"
    print(f"logits relative error vs float32 ({shape}; torch {torch.__version__}, CPU)")
    for k, v in rows.items():
        print(f"  {k:<48} {v:.2e}")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "bf16_error_budget.json").write_text(
        json.dumps({"shape": shape, "rel_err": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
