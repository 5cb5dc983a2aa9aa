"""The engine benchmark's correctness phases: transformers' logits of one prompt on the
engine's dummy weights (bf16 SDPA and eager, and float32), computed before the engine takes
the GPU's memory (reference); then the engine's logits on the same weights (correct):
prefill, decode through the CUDA graph and eagerly, prefill over a cached prefix, the Triton
prefill kernel and a mixed batch, each against transformers (relative error <= 1e-2).

    python -m kvgrid.bench.gpu.engine_correct
"""

from __future__ import annotations

import gc
import sys

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu import engine_env
from kvgrid.bench.gpu.harness import DEV, GPU


def correctness_prompt(vocab: int, n: int = 700) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (n,), generator=g)


REF: dict[str, torch.Tensor] = {}  # reference logits of the correctness prompt (on the CPU)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(DEV).double(), b.to(DEV).double()
    return float((a - b).norm() / b.norm())


@torch.inference_mode()
def phase_reference(args) -> dict:
    """Transformers' logits of the correctness prompt on the engine's dummy weights, in bf16
    (SDPA and eager attention) and in float32 (the weights upcast exactly), computed before
    the engine takes the GPU's memory: float32 weights of an 8B model need 32 GB."""
    from kvgrid.models.llama import LlamaForCausalLM as KvModel
    from kvgrid.models.loader import resolve_model

    dtype = torch.bfloat16 if GPU else torch.float32
    cfg = resolve_model(args.shape, "dummy", 0).config
    # the engine's own construction and init (ModelRunner._load_model): same tensors
    with torch.device("meta"):
        m = KvModel(cfg, 1024)
    m = m.to_empty(device=DEV).to(dtype)
    m.init_dummy(0)
    state = m.hf_state_dict()
    REF["weights_checksum"] = weights_checksum(m)
    prompt = correctness_prompt(cfg.vocab_size)[None].to(DEV)
    hf = common.hf_from_state(state, args.shape)
    REF["bf16"] = hf(prompt).logits[0].float().cpu()
    hf.config._attn_implementation = "eager"
    REF["bf16_eager"] = hf(prompt).logits[0].float().cpu()
    del hf
    hf32 = common.hf_from_state({k: v.float() for k, v in state.items()}, args.shape)
    del m, state
    gc.collect()
    REF["fp32"] = hf32(prompt).logits[0].float().cpu()
    del hf32
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "floor_hf_eager_vs_hf_sdpa": rel(REF["bf16_eager"], REF["bf16"]),
        "floor_hf_bf16_vs_fp32": rel(REF["bf16"], REF["fp32"]),
        "floor_hf_eager_bf16_vs_fp32": rel(REF["bf16_eager"], REF["fp32"]),
        "fp32_logits_std": float(REF["fp32"].std()),
    }


def weights_checksum(model) -> float:
    return float(sum(p.double().abs().sum() for p in model.parameters()))


@torch.inference_mode()
def phase_correct(args, eng, hf) -> dict:
    run = eng.runner
    model, bs = run.model, run.block_size
    prompt = correctness_prompt(model.config.vocab_size)
    n = prompt.shape[0]
    ref = hf(prompt[None].to(DEV)).logits[0].float()  # [n, vocab], bf16 SDPA
    ref32 = REF["fp32"].to(DEV) if "fp32" in REF else None
    nblk = -(-n // bs)
    table = [list(range(run.num_blocks - nblk, run.num_blocks))]

    def fwd(ids, ctx, meta, graph=False):
        pos = torch.arange(ctx, ctx + ids.shape[0], device=DEV)
        if graph:
            h = run.graphs.run(ids.to(DEV), pos, meta)
        else:
            h = model(ids.to(DEV), pos, run.kv_cache, meta, run.backend)
        return model.compute_logits(h)

    res = {}

    def check(name: str, logits: torch.Tensor, rows: slice | list):
        res[name] = rel(logits, ref[rows])
        if ref32 is not None:
            res[name + "_vs_fp32"] = rel(logits, ref32[rows])

    # 1. fresh prefill of n-1 tokens (SDPA path: no cached prefix, long chunk)
    m = common.meta([0], [n - 1], table, bs)
    check("prefill_sdpa", fwd(prompt[: n - 1], 0, m), slice(0, n - 1))
    # 2. decode of the last token over the cache, through the CUDA graph when there is one
    m = common.meta([n - 1], [1], table, bs)
    graph = run.graphs is not None
    check(
        "decode_graph" if graph else "decode",
        fwd(prompt[n - 1 :], n - 1, m, graph),
        slice(n - 1, n),
    )
    check("decode_eager", fwd(prompt[n - 1 :], n - 1, m), slice(n - 1, n))
    # 3. prefill over a cached prefix: tokens 256.. on top of the first 256 in the cache
    c = 4 * bs
    m = common.meta([c], [n - c], table, bs)
    check("prefill_cached_prefix", fwd(prompt[c:], c, m), slice(c, n))
    # 4. fresh prefill through the Triton kernel instead of SDPA
    saved = run.backend.sdpa_min_query_len
    run.backend.sdpa_min_query_len = 10**9
    m = common.meta([0], [n], table, bs)
    check("prefill_triton", fwd(prompt, 0, m), slice(0, n))
    run.backend.sdpa_min_query_len = saved
    # 5. a mixed batch: one decode and one cached-prefix chunk in the same step
    m = common.meta([n - 1, c], [1, n - c], table * 2, bs)
    ids = torch.cat([prompt[n - 1 :], prompt[c:]])
    pos = torch.cat([torch.tensor([n - 1]), torch.arange(c, n)]).to(DEV)
    lg = model.compute_logits(model(ids.to(DEV), pos, run.kv_cache, m, run.backend))
    check("mixed_batch", lg, [n - 1, *range(c, n)])
    res["greedy_agree_prefill"] = float(
        (fwd(prompt, 0, common.meta([0], [n], table, bs)).argmax(-1) == ref.argmax(-1))
        .float()
        .mean()
    )
    res["pass"] = all(
        v <= 1e-2
        for k, v in res.items()
        if not k.startswith(("greedy", "floor")) and not k.endswith("_vs_fp32")
    )
    # the bf16 floor on these weights: transformers against itself, eager vs SDPA, and
    # against float32
    hf.config._attn_implementation = "eager"
    try:
        eager = hf(prompt[None].to(DEV)).logits[0].float()
        res["floor_hf_eager_vs_hf_sdpa"] = rel(eager, ref)
    finally:
        hf.config._attn_implementation = "sdpa"
    if ref32 is not None:
        res["floor_hf_bf16_vs_fp32"] = rel(ref, ref32)
        # the reference phase ran transformers on weights it built the engine's way: the
        # same logits here prove they were the same weights
        res["reference_reproduced"] = rel(ref, REF["bf16"])
        res["weights_checksum_equal"] = weights_checksum(model) == REF["weights_checksum"]
    eng.block_manager.reset_prefix_cache()
    return res


def run(b: common.Bench) -> None:
    if not b.wants("correct"):
        return
    b.results.run_phase("reference", phase_reference, b.args)
    if b.engine is not None and b.hf is not None:
        b.results.run_phase("correct", phase_correct, b.args, b.engine, b.hf)


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    if "correct" in P:
        c = P["correct"]
        for label, keep in (
            ("rel err vs HF", lambda k: not k.endswith("_vs_fp32") and not k.startswith("floor")),
            ("rel err vs fp32", lambda k: k.endswith("_vs_fp32")),
            ("bf16 floors", lambda k: k.startswith("floor")),
        ):
            rows.append(
                (
                    label,
                    ", ".join(
                        f"{k.removesuffix('_vs_fp32')} {v:.1e}"
                        for k, v in c.items()
                        if isinstance(v, float)
                        and not k.startswith(("greedy", "reference"))
                        and keep(k)
                    ),
                    ("pass" if c["pass"] else "FAIL") if label == "rel err vs HF" else "",
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [engine_env, sys.modules[__name__]], "correct")


if __name__ == "__main__":
    sys.exit(main())
