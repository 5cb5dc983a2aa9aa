"""The embedded default model end to end: chat, stop strings, streaming, the CLI."""

import subprocess
import sys

from kvgrid import SamplingParams


def test_chat_answers_a_simple_question(default_llm):
    out = default_llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}],
        SamplingParams(max_tokens=32, temperature=0),
    )[0]
    c = out.outputs[0]
    assert "Paris" in c.text
    # the chat turn ends on the template's end-of-turn token, not on max_tokens
    assert c.finish_reason == "stop"


def test_multi_turn_chat_reuses_the_conversation_prefix(default_llm):
    history = [
        {"role": "system", "content": "You are a concise assistant. " * 20},
        {"role": "user", "content": "Name a colour."},
    ]
    params = SamplingParams(max_tokens=8, temperature=0)
    first = default_llm.chat(history, params)[0]
    history += [
        {"role": "assistant", "content": first.outputs[0].text},
        {"role": "user", "content": "Another one?"},
    ]
    second = default_llm.chat(history, params)[0]
    bs = default_llm.engine.config.block_size
    assert second.num_cached_tokens >= (len(first.prompt_token_ids) // bs) * bs
    assert second.num_cached_tokens > 0


def test_stop_strings_cut_the_text(default_llm):
    prompt = "Count: 1, 2, 3, 4, 5, 6, 7"
    ref = default_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    text = ref.outputs[0].text
    assert "9" in text, text
    out = default_llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop=["9"]))[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == "9"
    assert c.text == text[: text.index("9")]
    keep = default_llm.generate(
        prompt,
        SamplingParams(max_tokens=20, temperature=0, stop="9", include_stop_str_in_output=True),
    )[0]
    assert keep.outputs[0].text == text[: text.index("9") + 1]


def test_streamed_deltas_add_up_to_the_final_text(default_llm):
    eng = default_llm.engine
    params = SamplingParams(max_tokens=24, temperature=0, stop=["Paris is"])
    eng.add_request("stream", "Tell me about Paris, France.", params)
    pieces, ids, final = [], [], None
    while final is None:
        for o in eng.step():
            pieces.append(o.new_text)
            ids += o.new_token_ids
            if o.finished:
                final = o
    assert "".join(pieces) == final.outputs[0].text
    assert ids == final.outputs[0].token_ids
    assert "Paris is" not in "".join(pieces)


def test_cli_chat_answers(default_model_dir):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvgrid.cli",
            "chat",
            "What is the capital of France?",
            "--max-tokens",
            "24",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
    assert "prompt tokens from cache" in proc.stderr


def test_cli_reports_bad_input_without_a_traceback(default_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "kvgrid.cli", "generate", "hi", "--temperature", "-3"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2
    assert "temperature" in proc.stderr and "Traceback" not in proc.stderr
