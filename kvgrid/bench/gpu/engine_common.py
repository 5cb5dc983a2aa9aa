"""The engine benchmark's shared parts: the engine and transformers on the same dummy weights,
the workload, and the runner of its phases.

Model: the Llama-3.1-8B shape (the Llama-3-8B weights with a context long enough for 32K
prompts), random bf16 weights. A phase module (``engine_env``, ``engine_kernels``,
``engine_correct``, ``engine_decode``, ``engine_prefill``, ``engine_vs_transformers``,
``engine_calibration``) has ``run(b: Bench)``, which runs the phases of --phases it owns, and
``rows(phases)`` for the closing table. The engine and transformers' model are built when a
phase first asks for them; phases that need transformers' own memory (``Bench.later``) run
after the engine has been freed. Energy per token comes from NVML's energy counter where the
card has one. Writes ``gpu_engine.json`` (and ``profiles.txt``) under --out.
"""

# ruff: noqa: E501  (summary rows are long)
from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch

from kvgrid.bench.gpu.harness import (
    DEV,
    GPU,
    Results,
    add_common_args,
    default_shape,
    log,
    print_rows,
)
from kvgrid.gc_tuning import tune_gc

RESULTS = Results("gpu_engine.json")
PROFILES: list[str] = []  # torch.profiler tables, written to profiles.txt
STEPS: dict[str, list] = {}  # recorded engine steps per phase, for the calibration fit


class Energy:
    """NVML's cumulative energy counter (mJ), read around a phase."""

    def __init__(self):
        self.h = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.read()
        except Exception as e:  # no NVML or no counter on this card
            log("NVML energy counter unavailable:", e)
            self.h = None

    def read(self) -> float | None:
        if self.h is None:
            return None
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.h) / 1e3  # joules

    def per_token(self, j0: float | None, tokens: int) -> float | None:
        j1 = self.read()
        return None if j0 is None or j1 is None or not tokens else (j1 - j0) / tokens


def build_engine(args):
    from kvgrid.engine.config import EngineConfig
    from kvgrid.engine.llm_engine import LLMEngine

    cfg = EngineConfig(
        model=args.shape,
        load_format=args.load_format,
        dtype="bfloat16" if GPU else "float32",
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        cuda_graphs=not args.no_cuda_graphs,
        async_scheduling=args.async_scheduling == "on",
    )
    t0 = time.perf_counter()
    eng = LLMEngine(cfg)
    log(
        f"engine ready in {time.perf_counter() - t0:.1f}s: {eng.runner.num_blocks} KV blocks, "
        f"backend {eng.runner.backend.name}, graphs {eng.runner.graphs is not None}"
    )
    tune_gc()  # as a worker process does once its engine is built
    return eng


def build_hf(eng, shape: str):
    """transformers' LlamaForCausalLM holding the engine's very tensors (no copy)."""
    return hf_from_state(eng.runner.model.hf_state_dict(), shape)


def hf_from_state(state: dict, shape: str):
    """transformers' LlamaForCausalLM (SDPA attention) on the given HF-named tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvgrid.models.shapes import shape_dict

    hcfg = LlamaConfig.from_dict(shape_dict(shape))
    hcfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected, unexpected
    missing = [m for m in missing if "rotary" not in m]
    if hcfg.tie_word_embeddings:
        hf.tie_weights()
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing, missing
    rot = hf.model.rotary_emb
    hf.model.rotary_emb = type(rot)(config=hcfg, device=DEV)
    for name, buf in hf.named_buffers():
        assert not buf.is_meta, f"{name} left on the meta device"
    return hf.eval()


def meta(ctx_lens, q_lens, tables, block_size):
    from kvgrid.layers.attention.base import AttentionMetadata

    qsl, slots = [0], []
    for i, (c, n) in enumerate(zip(ctx_lens, q_lens)):
        qsl.append(qsl[-1] + n)
        slots += [
            int(tables[i][p // block_size]) * block_size + p % block_size for p in range(c, c + n)
        ]
    seq_lens = [c + n for c, n in zip(ctx_lens, q_lens)]
    i32 = dict(dtype=torch.int32, device=DEV)
    return AttentionMetadata(
        query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq_lens, **i32),
        context_lens=torch.tensor(ctx_lens, **i32),
        block_tables=torch.tensor(tables, **i32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEV),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        context_lens_cpu=list(ctx_lens),
    )


def make_workload(num: int, lo: int, hi: int, vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    reqs = []
    for _ in range(num):
        n_in = int(torch.randint(lo, hi + 1, (1,), generator=g))
        n_out = int(torch.randint(lo, hi + 1, (1,), generator=g))
        reqs.append((torch.randint(0, vocab, (n_in,), generator=g).tolist(), n_out))
    return reqs


def with_budget(eng, tokens: int):
    """Swap the step token budget (the config is frozen; the scheduler reads it per step)."""
    cfg = dataclasses.replace(eng.config, max_num_batched_tokens=tokens)
    eng.config = cfg
    eng.scheduler.config = cfg


def sync_row(P: dict, key: str, base: str, label: str) -> list[tuple[str, str, str]]:
    """A synchronous-scheduling run set against its asynchronous one."""
    if key not in P:
        return []
    x = P[key]
    a = P.get(base, {}).get("token_digests", [])
    same = sum(i == j for i, j in zip(a, x["token_digests"]))
    return [
        (
            label,
            f"{x.get('decode_tok_s') or x['output_tok_s']:.0f} tok/s, ITL p50/p99 {x['itl_p50_ms']:.2f}/{x['itl_p99_ms']:.2f} ms",
            f"{x['of_roofline']:.0%} of roofline; same tokens as async in {same}/{len(a)} requests",
        )
    ]


class Bench:
    """What the phase modules share in one run: the arguments, the results, and the engine,
    transformers' model and the energy counter, each built on first use."""

    def __init__(self, args: argparse.Namespace, phases: set[str]) -> None:
        self.args, self.results, self.phases = args, RESULTS, phases
        self._engine: Any = None
        self._hf: Any = None
        self._energy: Energy | None = None
        self._tried: set[str] = set()
        self.deferred: list[tuple[str, Callable[[int], Any]]] = []

    def wants(self, phase: str) -> bool:
        return phase in self.phases

    @property
    def engine_built(self) -> bool:
        return self._engine is not None

    @property
    def engine(self) -> Any:
        if self._engine is None and "engine" not in self._tried:
            self._tried.add("engine")
            self._engine = self._build("engine", build_engine, self.args)
        return self._engine

    @property
    def hf(self) -> Any:
        """transformers' model on the engine's own tensors (needs the engine)."""
        if self._hf is None and "hf" not in self._tried and self.engine is not None:
            self._tried.add("hf")
            self._hf = self._build("build_hf", build_hf, self.engine, self.args.shape)
        return self._hf

    @property
    def energy(self) -> Energy:
        if self._energy is None:
            self._energy = Energy()
        return self._energy

    def later(self, name: str, fn: Callable[[int], Any]) -> None:
        """Run ``fn(vocab_size)`` once the engine has given its KV pool and graphs back."""
        self.deferred.append((name, fn))

    def _build(self, name: str, fn: Callable[..., Any], *a: Any) -> Any:
        try:
            return fn(*a)
        except Exception as e:
            import traceback

            self.results.errors[name] = "".join(traceback.format_exception(e))[-3000:]
            traceback.print_exc()
            return None

    def finish(self) -> None:
        """Free the engine, then run the deferred phases (transformers sizes its own cache)."""
        if self._engine is None:
            return
        vocab = self._engine.model_config.vocab_size
        self._engine = None
        gc.unfreeze()
        gc.collect()
        if GPU:
            torch.cuda.empty_cache()
        for name, fn in self.deferred:
            self.results.run_phase(name, fn, vocab)


def main(
    argv: list[str] | None, modules: Sequence[ModuleType], phases: str, module: str = ""
) -> int:
    """Run ``modules`` in order on one engine; ``phases``: the default --phases; ``module``:
    the command's name (default: the last module's)."""
    module = module or modules[-1].__spec__.name
    ap = argparse.ArgumentParser(
        prog=f"python -m {module}", description=(modules[-1].__doc__ or "").split("\n\n")[0]
    )
    add_common_args(ap, shape=default_shape())
    ap.add_argument(
        "--phases",
        default=phases,
        help="comma-separated, of env,tests,kernels,correct,B,C,A,sync,hf (env always runs)",
    )
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    # A again with small prefill chunks, which keep mixed steps near a decode step (ITL p99)
    ap.add_argument("--small-budget", type=int, default=0, help="0: skip that run")
    ap.add_argument("--max-model-len", type=int, default=32768 + 1024)
    ap.add_argument("--num-kv-blocks", type=int, default=5000)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--async-scheduling", default="on", choices=["on", "off"])
    ap.add_argument("--hf-deadline-s", type=float, default=240.0)
    args = ap.parse_args(argv)
    RESULTS.start(args.out, module, argv)
    RESULTS.data["args"] = vars(args)
    torch.manual_seed(0)
    b = Bench(args, set(args.phases.split(",")))
    for m in modules:
        m.run(b)
    b.finish()
    cal = RESULTS.phases.get("calibration")
    if cal and cal.get("kv_bytes_per_token"):
        # top level, so that the results file is itself a simulator calibration
        # (kvgrid.planner.calibration.load_calibration reads these keys)
        RESULTS.data.update(cal)
    rows = [r for m in modules for r in m.rows(RESULTS.phases)]
    print_rows(rows)
    if RESULTS.errors:
        print("errors in:", ", ".join(RESULTS.errors))
    save()
    return 0


def save() -> None:
    path = RESULTS.save()
    if PROFILES:
        (path.parent / "profiles.txt").write_text("\n\n".join(PROFILES))
