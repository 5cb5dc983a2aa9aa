"""Guided decoding, penalties, logit_bias, n choices and prompt logprobs in the engine, each
against a reference; on a tiny random model (its tokenizer is the default model's), in the
synchronous and the asynchronous step loop."""

import json
import re

import jsonschema
import pytest
import torch

from kvgrid import LLM, SamplingParams
from kvgrid.engine import guided
from kvgrid.engine.guided import apply_token_bitmask
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.logits_processors import apply_penalties
from kvgrid.engine.sampling_params import GuidedDecoding, RequestError
from kvgrid.engine.sequence import Sequence

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["kind", "ok", "n", "tags"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return str(tiny_model_dir("llama"))


def run(eng: LLMEngine, requests: dict) -> dict:
    for rid, (prompt, params) in requests.items():
        eng.add_request(rid, prompt, params)
    final = {}
    for _ in range(2000):
        if not eng.has_unfinished_requests():
            break
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
    assert all(b.ref_count == 0 for b in eng.block_manager.blocks)
    return final


def guided_requests(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    reqs = {}
    for i in range(3):
        prompt = torch.randint(0, 1000, (20 + i,), generator=g).tolist()
        spec = GuidedDecoding("json_schema", json.dumps(SCHEMA))
        reqs[f"json{i}"] = (
            prompt,
            SamplingParams(max_tokens=80, temperature=0.9, seed=i, guided=spec),
        )
    reqs["regex"] = (
        [1, 2, 3],
        SamplingParams(max_tokens=20, temperature=0, guided=GuidedDecoding("regex", REGEX)),
    )
    choice = GuidedDecoding("choice", json.dumps(["red", "green", "blue"]))
    reqs["choice"] = (
        [4, 5],
        SamplingParams(max_tokens=20, temperature=1.0, seed=7, guided=choice, n=3),
    )
    # a penalised row in the same batch: it needs every earlier token too
    pen = SamplingParams(
        max_tokens=12,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
        repetition_penalty=1.2,
    )
    reqs["pen"] = ([9, 8, 7], pen)
    return reqs


def check_guided(final: dict) -> None:
    for i in range(3):
        c = final[f"json{i}"].outputs[0]
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop"
    assert re.fullmatch(REGEX, final["regex"].outputs[0].text)
    assert all(c.text in ("red", "green", "blue") for c in final["choice"].outputs)


def test_guided_output_follows_its_grammar_sync_and_async(tiny):
    """Both step loops mask every constrained row; the asynchronous one reads the last
    step's tokens before it masks, and draws the same tokens."""
    outs = []
    for async_scheduling in (False, True):
        eng = LLMEngine(model=tiny, async_scheduling=async_scheduling, block_size=16)
        final = run(eng, guided_requests())
        check_guided(final)
        st = eng.stats()
        assert st["guided_masked_steps"] > 0 and st["guided_errors"] == 0
        assert st["guided_mask_s"] > 0
        # the asynchronous loop builds masks while it makes the last step's outputs
        assert (st["guided_overlapped_steps"] > 0) == async_scheduling
        outs.append({rid: [c.token_ids for c in o.outputs] for rid, o in final.items()})
    assert outs[0] == outs[1]


def test_without_the_mask_a_random_model_breaks_the_grammar(tiny, monkeypatch):
    """The check above can fail: with masks off, the same requests break their grammars."""
    monkeypatch.setattr(guided.GuidedDecoder, "masks", lambda self, seqs: None)
    eng = LLMEngine(model=tiny, block_size=16)
    final = run(eng, guided_requests())
    assert eng.guided.errors > 0
    with pytest.raises((AssertionError, ValueError, jsonschema.ValidationError)):
        check_guided(final)


def test_a_grammar_is_compiled_once_and_its_further_templates_in_the_background(tiny, monkeypatch):
    """With ``copies`` templates per grammar (their rows build masks in parallel), the
    grammar is compiled once on the request's path and the other templates on the
    compiler's thread; answers from matchers of every template stay in the grammar."""
    eng = LLMEngine(model=tiny, block_size=16)
    eng.guided_matcher(SamplingParams(guided=GuidedDecoding("regex", "[0-9]+")))
    eng.guided.copies = 3
    compiles = []
    orig = guided._grammar_text
    monkeypatch.setattr(guided, "_grammar_text", lambda g: compiles.append(g) or orig(g))
    spec = GuidedDecoding("json_schema", json.dumps(SCHEMA))
    eng.add_request("r0", [1, 2, 3], SamplingParams(max_tokens=4, guided=spec))
    eng.guided.settle()
    entry = eng.guided._cache[spec]
    assert len(compiles) == 1 and len(entry.templates) == 3
    for i in range(1, 4):
        eng.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4, guided=spec))
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.guided.errors == 0


def test_grammar_compiled_once_and_bad_grammars_refused(tiny, monkeypatch):
    eng = LLMEngine(model=tiny, block_size=16)
    compiles = []
    orig = guided._grammar_text
    monkeypatch.setattr(guided, "_grammar_text", lambda g: compiles.append(g) or orig(g))
    spec = GuidedDecoding("json_schema", json.dumps(SCHEMA))
    for i in range(3):
        eng.add_request(f"r{i}", [1, 2, 3], SamplingParams(max_tokens=4, guided=spec, n=2))
    assert len(compiles) == 1 and eng.stats()["guided_grammars_cached"] == 1
    for bad, needle in [
        (GuidedDecoding("regex", "[0-9"), "regex"),
        (GuidedDecoding("json_schema", '{"type": "objectx"}'), "objectx"),
        (GuidedDecoding("json_schema", "{not json"), "not valid JSON"),
        (GuidedDecoding("choice", "[]"), "non-empty list"),
    ]:
        with pytest.raises(RequestError, match=needle):
            eng.add_request("bad", [1, 2], SamplingParams(guided=bad))
    with pytest.raises(RequestError, match="kind"):
        GuidedDecoding("xml", "x")


def test_token_bitmask_matches_a_reference():
    g = torch.Generator().manual_seed(0)
    vocab, rows = 100, torch.tensor([0, 2])
    logits = torch.randn(3, vocab, generator=g)
    allowed = torch.rand(2, vocab, generator=g) < 0.3
    bitmask = torch.zeros(2, 4, dtype=torch.int64)
    for r in range(2):
        for t in range(vocab):
            if allowed[r, t]:
                bitmask[r, t // 32] |= 1 << (t % 32)
    bitmask = bitmask.to(torch.int32)  # bit 31 makes some words negative, as llguidance's
    want = logits.clone()
    for j, r in enumerate(rows.tolist()):
        want[r][~allowed[j]] = float("-inf")
    every = logits[rows].clone()
    apply_token_bitmask(logits, rows, bitmask)
    assert torch.equal(logits, want)
    apply_token_bitmask(every, None, bitmask)  # every row constrained
    assert torch.equal(every, want[rows])


def _seq(prompt, output, params):
    s = Sequence("r", prompt, params, b"", 16, 100)
    for t in output:
        s.append_token(t)
    return s


def test_penalties_match_a_reference():
    g = torch.Generator().manual_seed(1)
    vocab = 50
    seqs = [
        _seq([1, 2, 3], [4, 4, 5], SamplingParams(frequency_penalty=0.7, presence_penalty=0.3)),
        _seq([1, 2], [2, 9], SamplingParams()),  # untouched
        _seq([6, 7, 7], [7, 8], SamplingParams(repetition_penalty=1.5, presence_penalty=-0.5)),
    ]
    logits = torch.randn(3, vocab, generator=g)
    want = logits.clone()
    for i, s in enumerate(seqs):
        p = s.params
        for t in set(s.token_ids) if p.repetition_penalty != 1.0 else ():
            x = want[i, t]
            want[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(s.output_token_ids):
            c = s.output_token_ids.count(t)
            want[i, t] -= p.frequency_penalty * c + p.presence_penalty
    apply_penalties(logits, seqs)
    assert torch.allclose(logits, want, atol=1e-6)


def test_logit_bias_steers_and_bans(tiny):
    llm = LLM(tiny, block_size=16)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    base = llm.generate([[1, 2, 3]], greedy)[0].outputs[0].token_ids
    forced = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={"777": 100})
    assert llm.generate([[1, 2, 3]], forced)[0].outputs[0].token_ids == [777] * 6
    ban = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logit_bias={base[0]: -100})
    assert llm.generate([[1, 2, 3]], ban)[0].outputs[0].token_ids[0] != base[0]
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate([[1]], SamplingParams(logit_bias={"x": 1}))
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate([[1]], SamplingParams(logit_bias={10**6: 1}))


def test_n_choices_share_the_prompt_blocks_and_seed_each(tiny):
    llm = LLM(tiny, block_size=16, num_kv_blocks=64)
    eng = llm.engine
    prompt = list(range(100, 150))  # 3 full blocks and a partial one
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=4, ignore_eos=True)
    hits0 = eng.counters["prefix_cache_hits"]
    out = llm.generate([prompt], p)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    # the first choice computed the prompt; the other three took its 3 full blocks
    assert eng.counters["prefix_cache_hits"] - hits0 == 3 * 48
    texts = [c.token_ids for c in out.outputs]
    assert len({tuple(t) for t in texts}) == 4  # each choice draws its own
    again = llm.generate([prompt], p)[0]
    assert [c.token_ids for c in again.outputs] == texts  # reproducible per choice
    one = SamplingParams(max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    other = llm.generate([list(range(300, 340)), prompt], [one, one])[1]
    assert other.outputs[0].token_ids == texts[0]  # choice 0 is the seed's own, in any batch


def test_prompt_logprobs_match_transformers(tiny):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    prompt = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.no_grad():
        lp = ref(torch.tensor([prompt])).logits[0].log_softmax(-1)
    want = [lp[i - 1, prompt[i]].item() for i in range(1, len(prompt))]
    top = lp[:-1].topk(3, dim=-1).indices.tolist()
    # chunked prefill (16 tokens a step), then the same prompt again: it must be computed
    # again rather than taken from the prefix cache, which holds no logits
    llm = LLM(tiny, block_size=16, max_num_batched_tokens=16)
    p = SamplingParams(max_tokens=1, prompt_logprobs=3)
    for _ in range(2):
        out = llm.generate([prompt], p)[0]
        got = out.prompt_logprobs
        assert got[0] is None and len(got) == len(prompt)
        assert [got[i][prompt[i]] for i in range(1, len(prompt))] == pytest.approx(want, abs=1e-4)
        assert all(set(top[i - 1]) <= set(got[i]) for i in range(1, len(prompt)))
