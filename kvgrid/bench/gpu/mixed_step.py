"""Host cost of mixed steps: a prefill chunk together with the decode batch.

Decode-only steps replay CUDA graphs; mixed steps (and prefill steps) are launched eagerly,
a few hundred kernels from Python. When launching a step takes longer than the GPU needs to
run it, the GPU idles inside the step and the step's time is the host's. This script puts
the engine in that state on purpose, scenario by scenario (decode rows at some context,
plus a prompt prefilled in chunks of a given size), and reports per mixed step the host
launch time (``LLMEngine._launch``: inputs, forward, sampling issued) against the device
time (CUDA events around it), then where the host time goes: cProfile's top functions and
torch.profiler's host-side op totals over a few steps. Each scenario runs with the decode
rows of mixed steps in the decode kernel and, for comparison, in the prefill kernel
(``--split-mixed``).

    python -m kvgrid.bench.gpu.mixed_step                    # one H200: ~2 min
    KVGRID_BENCH_SHAPE=smollm2-135m python -m kvgrid.bench.gpu.mixed_step --quick

Model: the Llama-3.1-8B shape, random bf16 weights, block 64, CUDA graphs for decode,
asynchronous scheduling. Writes $OUT/gpu_mixed_step.json (or ./out/).
"""

# ruff: noqa: E501  (summary rows are long)
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import random
import statistics
import sys
import time

import torch

from kvgrid.bench.gpu.harness import GPU, add_common_args, default_shape, log
from kvgrid.engine.config import EngineConfig
from kvgrid.engine.llm_engine import LLMEngine
from kvgrid.engine.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    decode_rows: int  # sequences decoding alongside the chunked prompt
    decode_ctx: int  # their prompt length
    prompt: int  # the prompt prefilled in chunks
    chunk: int  # prefill tokens per step


SCENARIOS = [
    Scenario("chunk 256 + 16 decode", 16, 2048, 8192, 256),
    Scenario("chunk 512 + 32 decode", 32, 1024, 8192, 512),
    Scenario("chunk 64 + 8 decode", 8, 4096, 4096, 64),
    Scenario("chunk 1024 alone", 0, 0, 8192, 1024),
    # as in the store replay: long conversations decoding next to a new turn's chunks
    Scenario("chunk 256 + 16 decode at 8K", 16, 8192, 4096, 256),
]
QUICK = [Scenario("chunk 64 + 4 decode", 4, 128, 512, 64)]


class StepTimes:
    """Per engine step(): the host time of its launch and the device time the engine
    measured for it (GPU events; on the CPU, launch to completion)."""

    SECTIONS = ("prepare", "forward", "logits")

    def __init__(self, eng: LLMEngine, synced: bool = False) -> None:
        self.eng, self.synced = eng, synced
        self.rows: list[dict] = []
        self._pending: dict[int, dict] = {}
        self._section = dict.fromkeys(self.SECTIONS, 0.0)
        self._launch, self._record = eng._launch, eng._record_speed
        eng._launch, eng._record_speed = self._on_launch, self._on_record
        runner = eng.runner
        self._wrapped = [(runner, "prepare"), (runner.model, "forward"),
                         (runner.model, "compute_logits")]  # fmt: skip
        for (obj, attr), name in zip(self._wrapped, self.SECTIONS, strict=True):
            setattr(obj, attr, self._timed(getattr(obj, attr), name))

    def _timed(self, fn, name: str):
        def call(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self._section[name] += time.perf_counter() - t

        return call

    def _on_launch(self, sched, prev):
        if self.synced and GPU:  # the GPU idle at the launch: its host time alone
            torch.cuda.synchronize()
        self._section = dict.fromkeys(self.SECTIONS, 0.0)
        t = time.perf_counter()
        step = self._launch(sched, prev)
        row = {
            "launch_ms": (time.perf_counter() - t) * 1e3,
            **{f"{k}_ms": v * 1e3 for k, v in self._section.items()},
            "prefill": sum(s.num_tokens for s in sched.scheduled if s.num_tokens > 1),
            "decode": sum(1 for s in sched.scheduled if s.num_tokens == 1),
        }
        self.rows.append(row)
        self._pending[id(sched)] = row
        return step

    def _on_record(self, sched, seconds: float) -> None:
        row = self._pending.pop(id(sched), None)
        if row is not None:
            row["device_ms"] = seconds * 1e3
        self._record(sched, seconds)

    def close(self) -> None:
        del self.eng._launch, self.eng._record_speed
        for obj, attr in self._wrapped:
            delattr(obj, attr)


def build_engine(args) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=args.shape,
            load_format="dummy",
            dtype="bfloat16" if GPU else "float32",
            max_model_len=16384,
            max_num_seqs=64,
            max_num_batched_tokens=2048,
            num_kv_blocks=args.num_kv_blocks,
            cuda_graphs=GPU,
        )
    )


def set_budget(eng: LLMEngine, tokens: int) -> None:
    cfg = dataclasses.replace(eng.config, max_num_batched_tokens=tokens)
    eng.config = eng.scheduler.config = cfg


def drain(eng: LLMEngine) -> None:
    for rid in list(eng.seqs):
        eng.abort_request(rid)
    while eng.has_unfinished_requests():
        eng.step()


def top_functions(prof: cProfile.Profile, key: str, n: int = 30) -> str:
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(n)
    return s.getvalue()


def gpu_kernel_ms(prof) -> float:
    """Sum of kernel durations (ms) in a CUDA-activity profile."""
    return sum(e.device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3  # fmt: skip


def _prompt_steps(eng: LLMEngine, rid: str, prompt: list[int], on_step=None) -> None:
    eng.add_request(rid, prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    j = 0
    while rid in eng.seqs:
        if on_step is not None:
            on_step(j)
        eng.step()
        j += 1


# "warm" is an asynchronous pass whose numbers are dropped: a scenario's first pass ran up to
# 3x slower than the same pass repeated (first uses of shapes), whichever variant went first
MODES = ("warm", "async", "synced", "kernels", "profile")


def run_scenario(eng: LLMEngine, sc: Scenario, rng: random.Random, profile: bool) -> dict:
    """The decode rows reach steady decoding, then one prompt per mode is prefilled in
    chunks next to them: ``async`` as the engine runs; ``synced`` with the GPU idle at
    each launch (host time alone); ``kernels`` under a CUDA-activity profile (the GPU's
    kernel time per step); ``profile`` (first scenario only) under cProfile and the
    host-side torch profiler."""
    vocab = eng.model_config.vocab_size
    modes = MODES[: 5 if profile else 4] if GPU else MODES[:3]
    steps = sc.prompt // sc.chunk
    set_budget(eng, max(sc.chunk + sc.decode_rows, 2 * sc.decode_ctx))
    decode = SamplingParams(
        max_tokens=len(modes) * (steps + 4) + 64, temperature=0, ignore_eos=True
    )
    for i in range(sc.decode_rows):
        eng.add_request(f"d{i}", [rng.randrange(vocab) for _ in range(sc.decode_ctx)], decode)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in eng.seqs.values()):
        eng.step()  # until every decode row has its prompt in the cache
    for _ in range(4):
        eng.step()
    set_budget(eng, sc.chunk + sc.decode_rows)
    out: dict = {"scenario": dataclasses.asdict(sc)}
    for mode in modes:
        times = StepTimes(eng, synced=mode == "synced")
        prompt = [rng.randrange(vocab) for _ in range(sc.prompt)]
        if mode == "kernels":
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            _prompt_steps(eng, f"p-{mode}", prompt)
            torch.cuda.synchronize()
            prof.__exit__(None, None, None)
            out["kernel_ms_per_step"] = gpu_kernel_ms(prof) / max(1, len(times.rows))
        elif mode == "profile":
            cprof = cProfile.Profile()
            tprof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

            def on_step(j: int, cprof=cprof, tprof=tprof) -> None:
                if j == 2:
                    cprof.enable()
                elif j == 6:
                    cprof.disable()
                    tprof.__enter__()
                elif j == 9:
                    tprof.__exit__(None, None, None)

            _prompt_steps(eng, f"p-{mode}", prompt, on_step)
            out["cprofile_tottime"] = top_functions(cprof, "tottime")
            out["cprofile_cumtime"] = top_functions(cprof, "cumulative", 40)
            out["torch_ops"] = tprof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=30
            )
        else:
            _prompt_steps(eng, f"p-{mode}", prompt)
        times.close()
        mixed = [r for r in times.rows if r["prefill"] > 0 and "device_ms" in r][1:]  # 1st: warm-up
        out[mode] = {"rows": times.rows, "mixed_steps": len(mixed)}
        for k in ("launch_ms", "device_ms", *(f"{x}_ms" for x in StepTimes.SECTIONS)):
            out[mode][k] = statistics.fmean(r[k] for r in mixed) if mixed else None
    drain(eng)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvgrid.bench.gpu.mixed_step")
    add_common_args(ap, shape=default_shape())
    ap.add_argument("--num-kv-blocks", type=int, default=3000 if GPU else 400)
    ap.add_argument("--quick", action="store_true", help="one small scenario (CPU smoke)")
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--split-mixed", default="on,off",
                    help="decode rows of mixed steps in the decode kernel (on), the prefill kernel (off)")  # fmt: skip
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    eng = build_engine(args)
    log(f"engine ready in {time.perf_counter() - t0:.1f}s")
    rng = random.Random(0)
    results = {"device": torch.cuda.get_device_name() if GPU else "cpu", "shape": args.shape,
               "torch": torch.__version__, "scenarios": []}  # fmt: skip
    backend = eng.runner.backend
    default_min_rows = getattr(backend, "mixed_decode_min_rows", None)
    for k, sc in enumerate(QUICK if args.quick else SCENARIOS):
        for split in args.split_mixed.split(","):
            if hasattr(backend, "mixed_decode_min_rows"):  # off: all to the prefill kernel
                backend.mixed_decode_min_rows = default_min_rows if split == "on" else 1 << 30
            res = run_scenario(eng, sc, rng, profile=args.profile and k == 0 and split == "on")
            res["split_mixed"] = split
            results["scenarios"].append(res)
            log(sc.name, split, {m: {x: v for x, v in res[m].items() if x != "rows"} for m in ("async", "synced")},
                res.get("kernel_ms_per_step"))  # fmt: skip
            if "cprofile_tottime" in res:
                print(res["cprofile_tottime"], res["cprofile_cumtime"], res["torch_ops"], sep="\n")
    eng.close()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_mixed_step.json").write_text(json.dumps(results, indent=1, default=str))

    def f(v) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"\nmixed steps, {results['device']}, {args.shape}: ms per step (async: as the engine runs; "
          "synced: GPU idle at each launch; kernels: GPU kernel time)")  # fmt: skip
    print(
        "| scenario | decode rows in | steps | async launch | async device | synced launch (prepare/forward/logits) | synced device | kernels |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results["scenarios"]:
        a, s = r["async"], r["synced"]
        print(
            f"| {r['scenario']['name']} | {'decode kernel from 16 rows' if r['split_mixed'] == 'on' else 'prefill kernel'} | {a['mixed_steps']} | {f(a['launch_ms'])} | {f(a['device_ms'])} "
            f"| {f(s['launch_ms'])} ({f(s['prepare_ms'])}/{f(s['forward_ms'])}/{f(s['logits_ms'])}) "
            f"| {f(s['device_ms'])} | {f(r.get('kernel_ms_per_step'))} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
