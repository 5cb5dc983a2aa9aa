"""Guided decoding on the GPU: decode throughput with a JSON schema active against
unconstrained decoding at batch 64, and the host time of the token mask per step.

    # once, on any machine with the default model (the device has no tokenizer of Llama 3's
    # size): SmolLM2's 49152 tokens, extended by BPE merges to 128256
    PYTHONPATH=. python3 bench/gpu_guided.py tokenizer --out .whl/tok128k
    # on the GPU: Llama-3-8B shape, random bf16 weights, that tokenizer
    PYTHONPATH=. python3 bench/gpu_guided.py run --tokenizer .whl/tok128k --out $OUT

Phases: correct (guided requests on the engine: no token outside its grammar, finished
answers parse and validate), masks (the host building 64 masks, and the device applying
them, alone), speed (64 requests of 128 prompt tokens; 256 tokens each, unconstrained,
then with the schema below; throughput over the steps where all 64 decode, and the host
time of each step's masks). The schema asks for at least 64 items, so no request ends
before max_tokens and the batch stays full. Prints a table last; writes
$OUT/gpu_guided.json. ``--shape smollm2-135m --batch 8 --max-tokens 16`` runs on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvgrid.engine.sampling_params import GuidedDecoding, SamplingParams

ITEMS = {  # structure in every token: keys, enums, bounded integers, short strings
    "type": "object",
    "properties": {
        "items": {
            "type": "array",
            "minItems": 64,
            "items": {
                "type": "object",
                "properties": {
                    "kind": {"enum": ["click", "view", "buy", "refund"]},
                    "qty": {"type": "integer", "minimum": 0, "maximum": 999},
                    "note": {"type": "string", "maxLength": 12},
                    "ok": {"type": "boolean"},
                },
                "required": ["kind", "qty", "note", "ok"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["items"],
    "additionalProperties": False,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ---- the tokenizer -----------------------------------------------------------------------


def corpus(limit_bytes: int) -> list[str]:
    """Python sources of the standard library, in a fixed order, up to ``limit_bytes``."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for f in sorted(root.rglob("*.py")):
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= limit_bytes:
            break
    return texts


def _pair_counts(tok, texts: list[str], n: int) -> dict[int, int]:
    """How often each pair of adjacent tokens (a * n + b) occurs inside a word."""
    counts: dict[int, int] = {}
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(enc.ids, dtype=np.int64)
        words = np.asarray([-1 if w is None else w for w in enc.word_ids], dtype=np.int64)
        same = (words[1:] == words[:-1]) & (words[1:] >= 0)
        keys, c = np.unique(ids[:-1][same] * n + ids[1:][same], return_counts=True)
        for k, v in zip(keys.tolist(), c.tolist()):
            counts[k] = counts.get(k, 0) + v
    return counts


def make_tokenizer(out: Path, vocab_size: int = 128256, corpus_mb: int = 24) -> None:
    """SmolLM2's byte-level BPE, extended to ``vocab_size`` tokens by merging the most
    frequent adjacent token pairs inside words of a code corpus, in rounds (each new token
    is a valid BPE merge of two existing ones, ranked after them)."""
    import tokenizers

    from kvgrid.models.default import ensure_default_model

    src = ensure_default_model(progress=False)
    data = json.loads((src / "tokenizer.json").read_text())
    vocab: dict[str, int] = data["model"]["vocab"]
    merges = data["model"]["merges"]
    texts = corpus(corpus_mb * 2**20)
    start = len(vocab)
    for _ in range(8):
        if len(vocab) >= vocab_size:
            break
        tok = tokenizers.Tokenizer.from_str(json.dumps(data))
        inv = {i: t for t, i in vocab.items()}
        n = len(vocab)
        counts = _pair_counts(tok, texts, n)
        # a round takes at most as many merges as it had tokens: later rounds build on them
        budget = min(vocab_size - len(vocab), n)
        for k in sorted(counts, key=lambda k: (-counts[k], k)):
            a, b = inv[k // n], inv[k % n]
            if a + b in vocab:
                continue
            vocab[a + b] = len(vocab)
            merges.append([a, b])
            budget -= 1
            if not budget:
                break
    if len(vocab) < vocab_size:
        raise RuntimeError(f"corpus gave {len(vocab)} tokens, not {vocab_size}: raise corpus_mb")
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for f in TOKENIZER_FILES[1:]:
        if (src / f).is_file():
            shutil.copy(src / f, out / f)
    check = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    log(f"tokenizer: {check.get_vocab_size()} tokens ({len(vocab) - start} merged) in {out}")


# ---- the engine --------------------------------------------------------------------------


def model_dir(shape: str, tokenizer: Path, tmp: Path) -> Path:
    """A model directory of ``shape``'s config.json (a shape name, or a model directory;
    weights are random) and the tokenizer."""
    from kvgrid.models.shapes import shape_dict

    d = tmp / "model"
    d.mkdir(parents=True, exist_ok=True)
    if Path(shape).is_dir():
        cfg = json.loads((Path(shape) / "config.json").read_text())
    else:
        cfg = shape_dict(shape)
    # end of sequence as this tokenizer says (the shape's ids are ordinary tokens here)
    cfg.pop("eos_token_id", None)
    cfg.pop("bos_token_id", None)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in TOKENIZER_FILES:
        if (tokenizer / f).is_file():
            shutil.copy(tokenizer / f, d / f)
    return d


class StepTimer:
    """Wall time of each engine step and of each mask build, with the batch it ran."""

    def __init__(self, eng) -> None:
        self.eng = eng
        self.steps: list[tuple[float, int, bool]] = []  # seconds, running, decode only
        self.masks: list[float] = []
        inner_step = eng.step

        def step():
            running = [s for s in eng.scheduler.running if not s.is_finished]
            decode = all(s.num_tokens - s.num_computed_tokens <= 1 for s in running)
            decode = decode and not eng.scheduler.waiting
            t0 = time.perf_counter()
            out = inner_step()
            self.steps.append((time.perf_counter() - t0, len(running), decode))
            return out

        eng.step = step

    def watch_masks(self) -> None:
        g = self.eng.guided
        inner = g.masks

        def masks(seqs):
            t0 = time.perf_counter()
            out = inner(seqs)
            self.masks.append(time.perf_counter() - t0)
            return out

        g.masks = masks


def run_batch(eng, batch: int, prompt_len: int, max_tokens: int, guided, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = eng.model_config.vocab_size
    for i in range(batch):
        prompt = torch.randint(0, min(vocab, 30000), (prompt_len,), generator=g).tolist()
        p = SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=seed * 1000 + i, ignore_eos=True
        )
        p.guided = guided
        eng.add_request(f"r{seed}-{i}", prompt, p)
    timer = StepTimer(eng)
    if guided is not None:
        timer.watch_masks()
    final, t0 = {}, time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.outputs[0]
    wall = time.perf_counter() - t0
    eng.__dict__.pop("step", None)
    if eng.guided is not None:
        eng.guided.__dict__.pop("masks", None)
    full = [s for s, n, dec in timer.steps if dec and n == batch]
    toks = sum(len(c.token_ids) for c in final.values())
    return {
        "requests": len(final),
        "tokens": toks,
        "wall_s": round(wall, 3),
        "full_decode_steps": len(full),
        "step_ms_median": round(1e3 * statistics.median(full), 3) if full else None,
        "decode_tok_s": round(batch * len(full) / sum(full), 1) if full else None,
        "mask_ms_median": round(1e3 * statistics.median(timer.masks), 3) if timer.masks else None,
        "mask_ms_p90": round(1e3 * float(np.percentile(timer.masks, 90)), 3)
        if timer.masks
        else None,
        "finish": sorted({c.finish_reason for c in final.values()}),
        "outputs": final,
    }


def phase_correct(eng, max_tokens: int) -> dict:
    """Short guided requests: nothing outside the grammar; finished answers parse."""
    spec = GuidedDecoding("json_schema", json.dumps(ITEMS["properties"]["items"]["items"]))
    res = run_batch(eng, 8, 32, max_tokens, spec, seed=1)
    parsed = 0
    for c in res["outputs"].values():
        if c.finish_reason == "stop":
            obj = json.loads(c.text)
            assert set(obj) == {"kind", "qty", "note", "ok"}, obj
            parsed += 1
    assert eng.guided.errors == 0, f"{eng.guided.errors} tokens outside their grammar"
    return {"requests": res["requests"], "finished_and_valid": parsed, "grammar_errors": 0}


def phase_masks(eng, batch: int) -> dict:
    """The host building ``batch`` masks (fresh matchers at the schema's start) and the
    device applying them to [batch, vocab] logits, each alone."""
    from kvgrid.engine.guided import apply_token_bitmask
    from kvgrid.engine.sequence import Sequence

    spec = GuidedDecoding("json_schema", json.dumps(ITEMS))
    seqs = []
    for i in range(batch):
        s = Sequence(f"m{i}", [1, 2, 3], SamplingParams(guided=spec), b"", 16, 8)
        s.matcher = eng.guided.matcher(spec)
        seqs.append(s)
    host = []
    for _ in range(20):
        t0 = time.perf_counter()
        rows, bitmask = eng.guided.masks(seqs)
        host.append(time.perf_counter() - t0)
    dev = eng.device
    logits = torch.randn(batch, eng.model_config.vocab_size, device=dev)
    times = []
    for _ in range(20):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            apply_token_bitmask(logits, rows, bitmask)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            apply_token_bitmask(logits, rows, bitmask)
            times.append(time.perf_counter() - t0)
    return {
        "host_build_ms_median": round(1e3 * statistics.median(host[2:]), 3),
        "device_apply_ms_median": round(1e3 * statistics.median(times[2:]), 3),
    }


def run(args) -> dict:
    import llguidance

    from kvgrid.engine.llm_engine import LLMEngine

    out = Path(args.out or os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {
        "env": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "llguidance": llguidance.__version__
            if hasattr(llguidance, "__version__")
            else llguidance.get_version(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "config": vars(args).copy(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = model_dir(args.shape, Path(args.tokenizer), Path(tmp))
        t0 = time.perf_counter()
        eng = LLMEngine(
            model=str(path),
            load_format="dummy",
            max_num_seqs=args.batch,
            max_model_len=max(args.prompt_len + args.max_tokens, 32 + 48) + 64,
            kv_cache_memory_gb=2.0,
        )
        log(f"engine ready in {time.perf_counter() - t0:.1f}s ({args.shape}, {eng.device})")
        spec = GuidedDecoding("json_schema", json.dumps(ITEMS))
        eng.guided_matcher(SamplingParams(guided=spec))  # the tokenizer's tables, the grammar
        res["correct"] = phase_correct(eng, min(48, 4 * args.max_tokens))
        log("correct:", res["correct"])
        res["masks"] = phase_masks(eng, args.batch)
        log("masks alone:", res["masks"])
        run_batch(eng, args.batch, args.prompt_len, 8, None, seed=2)  # warm-up
        for name, guided in (("unconstrained", None), ("json_schema", spec)):
            r = run_batch(eng, args.batch, args.prompt_len, args.max_tokens, guided, seed=3)
            r.pop("outputs")
            res[name] = r
            log(name, r)
    u, g = res["unconstrained"], res["json_schema"]
    if u["decode_tok_s"] and g["decode_tok_s"]:
        res["ratio"] = round(g["decode_tok_s"] / u["decode_tok_s"], 4)
        res["mask_share_of_step"] = round(g["mask_ms_median"] / g["step_ms_median"], 4)
    (out / "gpu_guided.json").write_text(json.dumps(res, indent=1, default=str))
    rows = [
        ("mode", "decode tok/s", "step ms", "mask ms (p50/p90)", "full steps"),
        ("unconstrained", u["decode_tok_s"], u["step_ms_median"], "-", u["full_decode_steps"]),
        (
            "json_schema",
            g["decode_tok_s"],
            g["step_ms_median"],
            f"{g['mask_ms_median']}/{g['mask_ms_p90']}",
            g["full_decode_steps"],
        ),
    ]
    print()
    for r in rows:
        print(" | ".join(f"{x!s:>18}" for x in r))
    print(f"json_schema / unconstrained: {res.get('ratio')}; masks alone: {res['masks']}")
    print(f"wrote {out / 'gpu_guided.json'}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="build the 128256-token tokenizer")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=128256)
    t.add_argument("--corpus-mb", type=int, default=24)
    r = sub.add_parser("run", help="the benchmark")
    r.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    r.add_argument("--shape", default="llama3-8b", help="a shape name or a model directory")
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--prompt-len", type=int, default=128)
    r.add_argument("--max-tokens", type=int, default=256)
    r.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.cmd == "tokenizer":
        make_tokenizer(Path(args.out), args.vocab_size, args.corpus_mb)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
