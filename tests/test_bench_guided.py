"""bench/gpu_guided.py at tiny sizes on the CPU: its tokenizer builder makes a valid BPE
of the size asked for, and the benchmark runs end to end and writes its numbers."""

import json
import sys
from pathlib import Path

import tokenizers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_guided


def test_tokenizer_extension_is_a_valid_bpe_of_the_size_asked(tmp_path, default_model_dir):
    out = tmp_path / "tok"
    gpu_guided.make_tokenizer(out, vocab_size=49152 + 300, corpus_mb=1)
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152 + 300
    text = gpu_guided.corpus(1)[0]  # the first file of the corpus the merges came from
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert max(ids) >= 49152  # the merged tokens are used


def test_benchmark_runs_at_tiny_size(tmp_path, tiny_model_dir, default_model_dir):
    res = gpu_guided.run(
        gpu_guided.argparse.Namespace(
            tokenizer=str(default_model_dir),
            shape=str(tiny_model_dir("llama")),
            batch=3,
            prompt_len=8,
            max_tokens=6,
            out=str(tmp_path),
        )
    )
    assert res["correct"]["grammar_errors"] == 0
    saved = json.loads((tmp_path / "gpu_guided.json").read_text())
    for mode in ("unconstrained", "json_schema"):
        assert saved[mode]["tokens"] == 3 * 6 and saved[mode]["finish"] == ["length"]
    assert saved["json_schema"]["mask_ms_median"] > 0 and "ratio" in saved
