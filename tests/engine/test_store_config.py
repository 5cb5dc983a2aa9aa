"""The engine builds its context store from EngineConfig.kv_store (what every command's
--kv-store-* flags produce), and a restarted engine reuses what the last one stored."""

from __future__ import annotations

import argparse
import shutil

import pytest

from kvgrid.engine.args import add_engine_args, store_config_from_args
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.store import StoreConfig

BS = 16


def _greedy(engine: LLMEngine, rid: str, prompt: list[int], n: int) -> tuple[list[int], int]:
    from kvgrid.engine.sampling_params import SamplingParams

    engine.add_request(rid, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    return list(final.outputs[0].token_ids), final.num_cached_tokens


def test_restarted_engine_loads_the_last_ones_blocks_from_disk(tmp_path, tiny_model_dir):
    store = StoreConfig(
        g2_bytes=0,  # only G3: the second engine can only hit what reached the disk
        g3_dir=tmp_path / "g3",
        admit_after={"G2": 1, "G3": 1, "G4": 1},
        sweep_interval_s=0,
        master_key_file=None,
    )
    cfg = dict(
        model=str(tiny_model_dir("llama")),
        block_size=BS,
        num_kv_blocks=10,
        max_num_batched_tokens=256,
    )
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 6 + 5)]
    other = [(11 * i + 5) % 1000 + 10 for i in range(BS * 8)]
    cold, _ = _greedy(LLMEngine(**cfg), "cold", prompt, 6)

    first = LLMEngine(**cfg, kv_store=store)
    assert first.connector is not None and first.connector.store.g2 is None
    _greedy(first, "a", prompt, 6)
    _greedy(first, "b", other, 2)  # G1 holds 10 blocks: some of the prompt's are evicted
    first.close()  # G1's cached blocks are written too, and land before close returns

    second = LLMEngine(**cfg, kv_store=store)
    again, cached = _greedy(second, "c", prompt, 6)
    assert again == cold
    assert cached >= BS * 6  # the whole stored prefix, from the previous engine's disk
    assert second.stats()["store_loaded_tokens"] >= BS * 6
    second.close()


def test_store_flags_build_the_config(tmp_path, monkeypatch):
    monkeypatch.setenv("KVGRID_STORE_DIR", str(tmp_path))
    p = argparse.ArgumentParser()
    add_engine_args(p)
    cfg = store_config_from_args(p.parse_args([]), "w1")
    assert cfg.g2_bytes > 0 and cfg.g3_dir == tmp_path / "g3" / "w1" and cfg.encrypt
    cfg = store_config_from_args(p.parse_args(["--kv-store-disk-gb", "0"]), "w1")
    assert cfg.g3_dir is None
    assert store_config_from_args(p.parse_args(["--no-kv-store"])) is None
    with pytest.raises(ValueError, match="one backend"):
        store_config_from_args(
            p.parse_args(["--kv-store-shared-dir", "/x", "--kv-store-redis", "redis://h"])
        )


def test_prefix_hot_in_g1_is_admitted_to_disk(tmp_path, tiny_model_dir):
    """Disk admission wants a second sighting: a request served from G1 is one. Without it
    the blocks a conversation keeps hitting in G1 would never reach the disk tier. At
    shutdown admission is waived: what the engine held goes down, so a restart is warm."""
    from kvgrid import keys
    from kvgrid.store.object import tenant_id

    store = StoreConfig(
        g2_bytes=0,
        g3_dir=tmp_path / "g3",
        admit_after={"G2": 1, "G3": 2, "G4": 2},
        sweep_interval_s=0,
        master_key_file=None,
    )
    cfg = dict(model=str(tiny_model_dir("llama")), block_size=BS, num_kv_blocks=16)
    prompt = [(7 * i + 3) % 1000 + 10 for i in range(BS * 4 + 5)]
    other = [(11 * i + 5) % 1000 + 10 for i in range(BS * 15 + 8)]

    def stored(runs: int, evict: bool = True) -> tuple[int, int]:
        """Blocks of the prompt on disk while serving (after G1 evicted them), and after
        the engine closed."""
        shutil.rmtree(tmp_path / "g3", ignore_errors=True)
        eng = LLMEngine(**cfg, kv_store=store)
        for i in range(runs):
            _, cached = _greedy(eng, f"r{i}", prompt, 2)
        assert cached == (BS * 4 if runs > 1 else 0)  # the second run hit G1
        if evict:
            _greedy(eng, "other", other, 1)  # G1 holds 16 blocks: the prompt's are evicted
        st = eng.connector.store
        st.flush()
        ks = keys.block_keys(prompt, eng.scope.digest, BS)
        g3, tid = st.tier("G3"), tenant_id(keys.PUBLIC_TENANT)

        def on_disk() -> int:
            return sum(c is not None for c in g3.created_many(tid, ks))

        during = on_disk()
        eng.close()
        return during, on_disk()

    assert stored(1)[0] == 0  # seen once: not on disk
    assert stored(2)[0] == 4  # seen twice (once from G1): on disk while serving
    assert stored(1, evict=False) == (0, 4)  # still in G1 at shutdown: written down then
