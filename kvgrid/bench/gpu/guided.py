"""Guided decoding on the GPU: decode throughput with a JSON schema active against
unconstrained decoding at batch 64, and the host time of the token mask per step.

One command (the device has no tokenizer of Llama 3's size, so one is trained first: a
byte-level BPE of 128000 tokens over the Python sources installed there, plus 256 special
tokens, ~10-30 s):

    python -m kvgrid.bench.gpu.guided --out $OUT        # Llama-3-8B shape, batch 64
    python -m kvgrid.bench.gpu.guided --tiny --out /tmp/g   # a check on a CPU

Phases: correct (guided requests on the engine: no token outside its grammar, finished
answers parse and validate), masks (the host building 64 masks, and the device applying
them, alone), speed (64 requests of 128 prompt tokens; 256 tokens each, unconstrained,
then with the schema below; throughput over the steps where all 64 decode, and the host
time of each step's masks). The schema asks for at least 64 items, so no request ends
before max_tokens and the batch stays full. Writes $OUT/gpu_guided.json; prints a table
last.
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

from kvgrid.bench.gpu.harness import log
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
# a check on a CPU: a 2-layer Llama with a 4096-token vocabulary
TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


# ---- the tokenizer -----------------------------------------------------------------------


def corpus(limit_mb: float) -> list[str]:
    """Python sources of the standard library and the installed packages, in a fixed order,
    up to ``limit_mb`` MiB of text."""
    import sysconfig

    paths = sysconfig.get_paths()
    roots = dict.fromkeys(Path(paths[k]) for k in ("stdlib", "purelib", "platlib"))
    texts, total, limit = [], 0, limit_mb * 2**20
    for root in roots:
        for f in sorted(root.rglob("*.py")):
            try:
                t = f.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            texts.append(t)
            total += len(t)
            if total >= limit:
                return texts
    return texts


def special_tokens(n: int) -> list[str]:
    """Llama 3's way: beginning and end of text, the rest reserved."""
    names = ["<|begin_of_text|>", "<|end_of_text|>"]
    return (names + [f"<|reserved_special_token_{i}|>" for i in range(n)])[:n]


def make_tokenizer(out: Path, vocab_size: int, corpus_mb: float, n_special: int = 256) -> dict:
    """A byte-level BPE of ``vocab_size - n_special`` tokens trained on ``corpus``, then
    ``n_special`` special tokens at the end (ids from ``vocab_size - n_special``, as in
    Llama 3). Should the corpus give fewer merges, more reserved tokens fill the vocabulary
    up to ``vocab_size`` (the count is in the result)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t0 = time.perf_counter()
    texts = corpus(corpus_mb)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - n_special,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bpe = tok.get_vocab_size()
    specials = special_tokens(vocab_size - bpe)
    tok.add_special_tokens(specials)
    assert tok.get_vocab_size() == vocab_size, tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    cfg = {"bos_token": specials[0], "eos_token": specials[1], "model_max_length": 8192}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    info = {
        "vocab_size": vocab_size,
        "bpe_tokens": bpe,
        "special_tokens": len(specials),
        "corpus_mb": round(sum(map(len, texts)) / 2**20, 1),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log(f"tokenizer: {info}")
    return info


# ---- the engine --------------------------------------------------------------------------


def model_dir(cfg: dict, tokenizer: Path, tmp: Path) -> Path:
    """A model directory of config ``cfg`` (weights are random) and the tokenizer."""
    d = tmp / "model"
    d.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg)
    # the tokenizer's own beginning and end of text
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
        self.mask_waits: list[float] = []
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
        """Time each step's masks from the start of their build to their hand-over, and the
        part of it the engine thread waited for (what the overlap did not hide)."""
        g = self.eng.guided
        start, finish = g.start_masks, g.finish_masks

        def start_masks(seqs, background=True):
            job = start(seqs, background)
            if job is not None:
                job.bench_t0 = time.perf_counter()
            return job

        def finish_masks(job):
            t0 = time.perf_counter()
            out = finish(job)
            if job is not None:
                self.mask_waits.append(time.perf_counter() - t0)
                self.masks.append(time.perf_counter() - job.bench_t0)
            return out

        g.start_masks, g.finish_masks = start_masks, finish_masks


def pct(xs: list[float], q: float) -> float | None:
    """The ``q``-th percentile of ``xs`` (seconds) in milliseconds."""
    return round(1e3 * float(np.percentile(xs, q)), 3) if xs else None


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
        eng.guided.build_times.clear()
    final, t0 = {}, time.perf_counter()
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o.outputs[0]
    wall = time.perf_counter() - t0
    eng.__dict__.pop("step", None)
    if eng.guided is not None:
        for name in ("start_masks", "finish_masks"):
            eng.guided.__dict__.pop(name, None)
    full = [s for s, n, dec in timer.steps if dec and n == batch]
    toks = sum(len(c.token_ids) for c in final.values())
    return {
        "requests": len(final),
        "tokens": toks,
        "wall_s": round(wall, 3),
        "full_decode_steps": len(full),
        "step_ms_median": round(1e3 * statistics.median(full), 3) if full else None,
        "decode_tok_s": round(batch * len(full) / sum(full), 1) if full else None,
        "step_ms_p90": pct(full, 90),
        "step_ms_mean": round(1e3 * sum(full) / len(full), 3) if full else None,
        "mask_ms_median": pct(timer.masks, 50),
        "mask_ms_p90": pct(timer.masks, 90),
        "mask_ms_p99": pct(timer.masks, 99),
        "mask_wait_ms_median": pct(timer.mask_waits, 50),
        "mask_wait_ms_p90": pct(timer.mask_waits, 90),
        "mask_wait_ms_mean": round(1e3 * statistics.fmean(timer.mask_waits), 3)
        if timer.mask_waits
        else None,
        # llguidance's own time per step's masks (inside the build, on its thread)
        "build_ms_median": pct(list(eng.guided.build_times), 50) if guided else None,
        "build_ms_p90": pct(list(eng.guided.build_times), 90) if guided else None,
        "build_ms_p99": pct(list(eng.guided.build_times), 99) if guided else None,
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


def phase_replay(
    tokenizer_json: str, tokens: dict[str, list[int]], threads: list[int], copies: list[int]
) -> list[dict]:
    """The host's mask builds alone, replaying the tokens a schema run chose (its rows,
    step by step) with ``threads`` building and each grammar compiled ``copies`` times
    (rows spread over the copies): llguidance's time per step, p50/p90/p99."""
    import llguidance as llg

    vocab = json.loads(tokenizer_json)
    n_vocab = max(vocab["model"]["vocab"].values()) + 1 + len(vocab.get("added_tokens", []))
    llt = llg.LLTokenizer(tokenizer_json, n_vocab=n_vocab)
    grammar = llg.LLMatcher.grammar_from_json_schema(json.dumps(ITEMS))
    rows = [tokens[k] for k in sorted(tokens)]
    steps = min(map(len, rows))
    words = (n_vocab + 31) // 32
    buf = np.zeros((len(rows), words), dtype=np.int32)
    out = []
    for k in copies:
        for t in threads:
            templates = [llg.LLMatcher(llt, grammar, log_level=0) for _ in range(k)]
            ms = [templates[i % k].deep_copy() for i in range(len(rows))]
            ex = llg.LLExecutor(num_threads=t)
            secs = []
            for step in range(steps):
                t0 = time.perf_counter()
                ex.unsafe_compute_mask_ptr(
                    [(m, i) for i, m in enumerate(ms)], buf.ctypes.data, words * 4, len(ms)
                )
                secs.append(time.perf_counter() - t0)
                for m, r in zip(ms, rows):
                    m.consume_token(r[step])
            r = {"threads": t, "copies": k, **{f"p{q}_ms": pct(secs, q) for q in (50, 90, 99)}}
            r["mean_ms"] = round(1e3 * statistics.fmean(secs), 3)
            log("replay", r)
            out.append(r)
    return out


def shape_config(shape: str) -> dict:
    """A named shape, or the config.json of a model directory."""
    from kvgrid.models.shapes import shape_dict

    if Path(shape).is_dir():
        return json.loads((Path(shape) / "config.json").read_text())
    return shape_dict(shape)


def kv_bytes_per_token(cfg: dict, dtype_bytes: int = 4) -> int:
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * dtype_bytes


def run(args) -> dict:
    import llguidance

    from kvgrid.engine.llm_engine import LLMEngine

    out = Path(args.out or os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    cfg = shape_config(args.shape) if args.shape != "tiny" else dict(TINY)
    res: dict = {
        "env": {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "llguidance": getattr(llguidance, "__version__", None),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "config": vars(args).copy(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = Path(args.tokenizer) if args.tokenizer else Path(tmp) / "tokenizer"
        if not args.tokenizer:
            res["tokenizer"] = make_tokenizer(tok_dir, cfg["vocab_size"], args.corpus_mb)
        path = model_dir(cfg, tok_dir, Path(tmp))
        t0 = time.perf_counter()
        max_len = args.prompt_len + args.max_tokens + 64
        eng = LLMEngine(
            model=str(path),
            load_format="dummy",
            max_num_seqs=args.batch,
            max_model_len=max_len,
            # the CPU's pool (a GPU's is sized from its free memory): room for every request
            kv_cache_memory_gb=2 * args.batch * max_len * kv_bytes_per_token(cfg) / 2**30,
        )
        res["engine_init_s"] = round(time.perf_counter() - t0, 1)
        log(f"engine ready in {res['engine_init_s']}s ({args.shape}, {eng.device})")
        spec = GuidedDecoding("json_schema", json.dumps(ITEMS))
        t0 = time.perf_counter()
        eng.guided_matcher(SamplingParams(guided=spec))  # the tokenizer's tables, the grammar
        res["grammar_compile_s"] = round(time.perf_counter() - t0, 2)
        res["correct"] = phase_correct(eng, min(48, 4 * args.max_tokens))
        log("correct:", res["correct"])
        res["masks"] = phase_masks(eng, args.batch)
        log("masks alone:", res["masks"])
        run_batch(eng, args.batch, args.prompt_len, 8, None, seed=2)  # warm-up
        run_batch(eng, args.batch, args.prompt_len, 32, spec, seed=2)  # the grammar's lexer
        default, default_copies = eng.guided.threads, eng.guided.copies

        def speed(name: str, guided, threads, copies: int | None = None) -> dict:
            copies = copies or default_copies
            eng.guided.use_threads(threads)
            if copies != eng.guided.copies:
                eng.guided.copies = copies
                eng.guided._cache.clear()  # compiled again, as many times as asked
                eng.guided_matcher(SamplingParams(guided=spec))
            eng.guided.settle()  # every template compiled before the batch arrives
            r = run_batch(eng, args.batch, args.prompt_len, args.max_tokens, guided, seed=3)
            outputs = r.pop("outputs")
            if guided is not None and not (out / "guided_tokens.json").exists():
                # what the model chose, for replaying the masks' cost on any host
                toks = {rid: list(c.token_ids) for rid, c in outputs.items()}
                (out / "guided_tokens.json").write_text(json.dumps(toks))
                shutil.copy(tok_dir / "tokenizer.json", out / "tokenizer.json")
            r["mask_threads"], r["grammar_copies"] = threads, copies
            log(name, r)
            return r

        # pairs, alternating: a shared machine's slow spell hits one pair, not one mode
        pairs = []
        for rep in range(args.reps):
            pair = {n: speed(f"{rep} {n}", g, default) for n, g in
                    (("unconstrained", None), ("json_schema", spec))}  # fmt: skip
            u, g = pair["unconstrained"], pair["json_schema"]
            pair["ratio"] = round(g["decode_tok_s"] / u["decode_tok_s"], 4)
            pairs.append(pair)
        res["pairs"] = pairs
        mid = sorted(pairs, key=lambda p: p["ratio"])[len(pairs) // 2]
        res["unconstrained"], res["json_schema"] = mid["unconstrained"], mid["json_schema"]
        for n in args.mask_threads:
            for c in args.mask_copies:
                name = f"json_schema_threads_{n}_copies_{c}"
                res[name] = speed(name, spec, n, c)
        eng.guided.use_threads(default)
        res["defaults"] = {"mask_threads": default, "grammar_copies": default_copies}
        if args.replay_threads and (out / "guided_tokens.json").exists():
            res["replay"] = phase_replay(
                (out / "tokenizer.json").read_text(),
                json.loads((out / "guided_tokens.json").read_text()),
                args.replay_threads,
                args.replay_copies,
            )
    u, g = res["unconstrained"], res["json_schema"]
    if u["decode_tok_s"] and g["decode_tok_s"]:
        res["ratio"] = mid["ratio"]  # the median pair's
        res["ratios"] = [p["ratio"] for p in pairs]
        # the part of a step the engine thread spent waiting for masks
        res["mask_wait_share_of_step"] = round(g["mask_wait_ms_mean"] / g["step_ms_mean"], 4)
        for name in [k for k in res if k.startswith("json_schema_threads_")]:
            tag = name[len("json_schema_threads_") :]
            res[f"ratio_threads_{tag}"] = round(res[name]["decode_tok_s"] / u["decode_tok_s"], 4)
    (out / "gpu_guided.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {out / 'gpu_guided.json'}")

    def steps(r: dict) -> str:
        return f"{r['step_ms_median']}/{r['step_ms_p90']}/{r['step_ms_mean']}"

    rows = [
        (
            "mode",
            "decode tok/s",
            "step ms p50/p90/mean",
            "mask ms p50/p90",
            "build ms p50/p90",
            "mask wait ms",
        ),
        ("unconstrained", u["decode_tok_s"], steps(u), "-", "-", "-"),
    ]
    for name, r in list(res.items()):
        if name.startswith("json_schema") and isinstance(r, dict):
            masks = f"{r['mask_ms_median']}/{r['mask_ms_p90']}"
            build = f"{r['build_ms_median']}/{r['build_ms_p90']}"
            rows.append((name, r["decode_tok_s"], steps(r), masks, build, r["mask_wait_ms_mean"]))
    print(f"\n{res['env']['device']}, {args.shape}, batch {args.batch}, {args.max_tokens} tokens")
    for r in rows:
        print(" | ".join(f"{x!s:>16}" for x in r))
    m = res["masks"]
    print(
        f"json_schema / unconstrained: {res.get('ratio')} (median of the pairs "
        f"{res.get('ratios')}; target >= 0.90); masks alone: host "
        f"{m['host_build_ms_median']} ms for {args.batch} rows, "
        f"device {m['device_apply_ms_median']} ms"
    )
    for k, v in res.items():
        if k.startswith("ratio_threads_"):
            print(
                f"json_schema / unconstrained with mask threads {k[len('ratio_threads_') :]}: {v}"
            )
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.guided", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--tiny", action="store_true", help="a check on a CPU: tiny model and load")
    ap.add_argument("--shape", default=None, help="a shape name or a model directory")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (else trained)")
    ap.add_argument("--corpus-mb", type=float, default=None, help="text the tokenizer learns")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ints = lambda v: [int(x) for x in v.split(",") if x]
    ap.add_argument("--mask-threads", default="1", type=ints,
                    help="mask-building thread counts to run the schema with, besides the "
                    "engine's default")  # fmt: skip
    ap.add_argument("--mask-copies", default="1", type=ints,
                    help="compiled copies of the grammar for each --mask-threads")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3, help="unconstrained/schema pairs, alternating")
    ap.add_argument(
        "--replay-threads",
        default="1,2,4,8",
        type=ints,
        help="mask threads to replay the schema run's host work with (none: skip)",
    )
    ap.add_argument("--replay-copies", default="1,8,64", type=ints,
                    help="compiled copies of the grammar to replay it with")  # fmt: skip
    ap.add_argument("--out", default=None, help="where gpu_guided.json goes (default $OUT)")
    args = ap.parse_args(argv)
    defaults = (
        {"shape": "tiny", "corpus_mb": 3, "batch": 8, "prompt_len": 16, "max_tokens": 24}
        if args.tiny
        else {"shape": "llama3-8b", "corpus_mb": 96, "batch": 64, "prompt_len": 128,
              "max_tokens": 256}
    )  # fmt: skip
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
