"""kvgrid.bench.gpu.guided on the CPU: the tokenizer it trains is a byte-level BPE of the size
asked for with Llama 3's special tokens at the end, and `--tiny` runs the whole benchmark
(the same command as on the GPU, at tiny sizes) and writes its numbers."""

import json

import tokenizers

from kvgrid.bench.gpu import guided as gpu_guided
from kvgrid.models.tokenizer import Tokenizer


def test_trained_tokenizer_has_the_size_and_special_tokens_asked(tmp_path):
    out = tmp_path / "tok"
    info = gpu_guided.make_tokenizer(out, vocab_size=2048, corpus_mb=1, n_special=16)
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == 2048 and info["bpe_tokens"] + info["special_tokens"] == 2048
    assert info["special_tokens"] >= 16
    text = gpu_guided.corpus(1)[0]  # a file of the corpus it learnt from
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text and len(ids) < len(text.encode()) / 2  # merges are used
    ours = Tokenizer.from_dir(out)
    first = info["bpe_tokens"]
    assert ours.bos_token_id == first and ours.eos_token_ids == {first + 1}
    assert tok.id_to_token(first + 1) == "<|end_of_text|>"


def test_benchmark_runs_at_tiny_size(tmp_path):
    res = gpu_guided.run(
        gpu_guided.argparse.Namespace(
            tiny=True,
            shape="tiny",
            tokenizer=None,
            corpus_mb=2,
            batch=3,
            prompt_len=8,
            max_tokens=12,
            mask_threads=[1],
            mask_copies=[1, 2],
            reps=2,
            replay_threads=[1, 2],
            replay_copies=[1, 2],
            out=str(tmp_path),
        )
    )
    assert res["correct"]["grammar_errors"] == 0 and res["correct"]["finished_and_valid"] > 0
    saved = json.loads((tmp_path / "gpu_guided.json").read_text())
    assert saved["tokenizer"]["vocab_size"] == gpu_guided.TINY["vocab_size"]
    for mode in ("unconstrained", "json_schema"):
        assert saved[mode]["tokens"] == 3 * 12 and saved[mode]["finish"] == ["length"]
    assert saved["json_schema"]["mask_ms_median"] > 0 and "ratio" in saved
    assert len(saved["pairs"]) == 2 and saved["ratio"] in saved["ratios"]
    one, two = saved["json_schema_threads_1_copies_1"], saved["json_schema_threads_1_copies_2"]
    assert one["mask_threads"] == 1 and two["grammar_copies"] == 2
    assert "ratio_threads_1_copies_2" in saved and saved["defaults"]["mask_threads"] >= 1
    # the host's mask builds replayed from the schema run's own tokens, per threads/copies
    assert {(r["threads"], r["copies"]) for r in saved["replay"]} == {
        (t, c) for t in (1, 2) for c in (1, 2)
    }
    assert all(r["p50_ms"] > 0 for r in saved["replay"])
