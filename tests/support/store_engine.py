"""The store and engine as the connector tests build them: a small encrypted store over a
temporary directory, random kv_cache blocks, and the real engine (a tiny random model) with
the store attached."""

from __future__ import annotations

import os

import torch

from kvgrid import keys
from kvgrid.store import ContextStore, StoreConfig, StoreConnector
from kvgrid.store.crypto import KeyRing

MODEL = keys.KVScope("test-model", "bfloat16")
A = keys.tenant_scope(b"server-secret", "tenant-a")
KR = KeyRing({1: os.urandom(32)})
BS = 16


def kv_cache(num_blocks: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, 2, 2, BS, 2, 8), generator=g).to(torch.bfloat16)


def make(tmp_path, **kw) -> ContextStore:
    cfg = dict(g2_bytes=1 << 20, g3_dir=tmp_path / "g3", sweep_interval_s=0,
               admit_after={"G2": 1, "G3": 1, "G4": 1})  # fmt: skip
    cfg.update(kw)
    return ContextStore(StoreConfig(**cfg), keyring=KR)


def run_request(engine, rid: str, prompt: list[int], n: int) -> tuple[list[int], int]:
    from kvgrid import SamplingParams

    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid and out.finished:
                final = out
    return list(final.outputs[0].token_ids), final.num_cached_tokens


def engine_with_store(tiny_model_dir, store, **kw):
    from kvgrid.engine.llm_engine import LLMEngine

    cfg = dict(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=40,
               max_num_batched_tokens=256)  # fmt: skip
    cfg.update(kw)
    eng = LLMEngine(**cfg)
    conn = StoreConnector(store, eng.runner.kv_cache, BS)
    eng.attach_store(conn)
    return eng, conn
