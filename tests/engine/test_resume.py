"""Resuming a request on another engine with the tokens it already generated (what request
migration does when a worker dies): the client sees the same tokens and text as an
uninterrupted run, greedy or seeded, with limits and stop strings counted from the start."""

from __future__ import annotations

import pytest

from kvgrid.engine.sampling_params import RequestError, SamplingParams

PROMPT = [(13 * i + 7) % 4000 + 100 for i in range(45)]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    """Two engines on the same weights: the one a request starts on, the one it resumes on."""
    from kvgrid.engine.llm_engine import LLMEngine

    model = str(tiny_model_dir("llama"))
    return [LLMEngine(model=model, block_size=16, num_kv_blocks=64) for _ in range(2)]


def run(engine, rid, params, stop_after=None, **resume):
    """(token ids, streamed text, finish reason); with ``stop_after``, the request is aborted
    once that many tokens are out, as a dying worker would leave it."""
    engine.add_request(rid, PROMPT, params, **resume)
    ids, text, finish = list(resume.get("resume_output") or []), "", None
    while engine.has_unfinished_requests():
        for out in engine.step():
            ids += out.new_token_ids
            text += out.new_text
            finish = out.outputs[0].finish_reason
            if stop_after is not None and len(ids) >= stop_after and not out.finished:
                engine.abort_request(rid)
                return ids, text, None
    return ids, text, finish


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=16, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=1.0, seed=1234, ignore_eos=True),
        SamplingParams(max_tokens=16, temperature=0, min_tokens=12),
    ],
    ids=["greedy", "seeded", "min_tokens"],
)
@pytest.mark.parametrize("cut", [1, 15])
def test_resumed_request_continues_exactly_where_it_stopped(engines, params, cut):
    a, b = engines
    ref_ids, ref_text, ref_finish = run(a, f"ref-{cut}", params)
    ids, text, _ = run(a, f"cut-{cut}", params, stop_after=cut)
    rest_ids, rest_text, finish = run(
        b, f"resume-{cut}", params, resume_output=ids, emitted_text_len=len(text)
    )
    assert rest_ids == ref_ids
    assert text + rest_text == ref_text
    assert finish == ref_finish


def test_a_stop_string_across_the_cut_is_still_found(engines):
    a, b = engines
    free = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    _, text, _ = run(a, "free", free)
    # cut after 10 tokens; the stop string starts before the cut and ends after it
    _, text10, _ = run(a, "probe", free, stop_after=10)
    start = max(0, len(text10) - 2)
    stop = text[start : start + 5]
    assert len(stop) == 5
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    _, ref_text, ref_finish = run(a, "ref-stop", params)
    assert ref_finish == "stop" and ref_text == text[:start]
    cut_ids, cut_text, _ = run(a, "cut-stop", params, stop_after=10)
    _, rest_text, finish = run(
        b, "resume-stop", params, resume_output=cut_ids, emitted_text_len=len(cut_text)
    )
    assert cut_text + rest_text == ref_text and finish == "stop"


def test_resume_refuses_what_cannot_continue(engines):
    a, _ = engines
    p = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(RequestError, match="nothing is left"):
        a.add_request("full", PROMPT, p, resume_output=[5, 6, 7, 8])
    with pytest.raises(RequestError, match="vocabulary"):
        a.add_request("bad", PROMPT, p, resume_output=[-1])
    with pytest.raises(RequestError, match="several choices"):
        a.add_request("n2", PROMPT, SamplingParams(max_tokens=4, n=2), resume_output=[5])
    with pytest.raises(RequestError, match="logprobs"):
        a.add_request("lp", PROMPT, SamplingParams(max_tokens=4, logprobs=1), resume_output=[5])
    assert not a.has_unfinished_requests()


def test_a_guided_request_resumes_inside_its_grammar(engines):
    """The new engine's grammar takes the delivered tokens first: the rest follows the
    schema from where the answer stood, and the whole answer equals an uninterrupted one
    (without the matcher advanced, the resumed output would start the JSON again)."""
    import json

    from kvgrid.engine.sampling_params import GuidedDecoding

    a, b = engines
    schema = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
              "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["kind", "n"], "additionalProperties": False}  # fmt: skip
    spec = GuidedDecoding("json_schema", json.dumps(schema))
    params = SamplingParams(max_tokens=40, temperature=0, guided=spec)
    ref_ids, ref_text, ref_finish = run(a, "g-ref", params)
    assert ref_finish == "stop" and json.loads(ref_text)["kind"] in ("cat", "dog")
    ids, text, _ = run(a, "g-cut", params, stop_after=3)
    rest_ids, rest_text, finish = run(
        b, "g-resume", params, resume_output=ids, emitted_text_len=len(text)
    )
    assert rest_ids == ref_ids and text + rest_text == ref_text and finish == "stop"
