"""The engine against transformers on the same weights: logits and greedy tokens.

float32 on the CPU, so the only differences are summation order: a tight tolerance.
"""

import pytest
import torch

from kvgrid import LLM, SamplingParams
from kvgrid.engine.scheduler import ScheduledSeq
from kvgrid.engine.sequence import Sequence

ARCHS = ["llama", "llama-tied", "llama-rope-scaled", "mistral", "qwen2", "qwen3"]


def hf_model(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


def engine_logits(llm: LLM, tokens: list[int], chunks: list[int]) -> torch.Tensor:
    """Logits at every position, computed chunk by chunk through the paged cache."""
    eng = llm.engine
    seq = Sequence("probe", tokens, SamplingParams(), eng.scope.digest, eng.config.block_size, 1)
    assert eng.block_manager.ensure_slots(seq, len(tokens))
    out = []
    runner = eng.runner
    try:
        with torch.inference_mode():
            for n in chunks:
                ids, pos, meta, _ = runner.prepare([ScheduledSeq(seq, n)])
                hidden = runner.model(ids, pos, runner.kv_cache, meta, runner.backend)
                out.append(runner.model.compute_logits(hidden))
                seq.num_computed_tokens += n
    finally:
        eng.block_manager.free_seq(seq)
    return torch.cat(out)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    ref_model = hf_model(path)
    llm = LLM(str(path), block_size=16, num_kv_blocks=64)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ref_model.config.vocab_size, (70,), generator=g).tolist()
    ref = hf_logits(ref_model, tokens)
    # one-shot prefill, chunked prefill crossing block edges, and token-by-token decode
    for chunks in ([70], [5, 16, 30, 19], [40] + [1] * 30):
        got = engine_logits(llm, tokens, chunks)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < 1e-5, (arch, chunks)
    # greedy generation is token-for-token equal
    out = llm.generate([tokens[:20]], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    with torch.no_grad():
        hf = ref_model.generate(
            torch.tensor([tokens[:20]]),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, 20:].tolist()
    assert out[0].outputs[0].token_ids == hf


def test_default_model_matches_transformers(default_llm, default_model_dir):
    ref_model = hf_model(default_model_dir)
    tok = default_llm.get_tokenizer()
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        add_special_tokens=False,
    )
    ref = hf_logits(ref_model, prompt)
    got = engine_logits(default_llm, prompt, [len(prompt)])
    assert rel_err(got, ref) < 1e-5
    out = default_llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))
    with torch.no_grad():
        hf = ref_model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    ours = out[0].outputs[0].token_ids
    # transformers keeps the EOS token in its output; the engine reports it too
    assert ours == hf[: len(ours)]
    assert "Paris" in out[0].outputs[0].text
