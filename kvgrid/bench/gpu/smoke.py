"""Every GPU benchmark once at small sizes, to show that each still runs end to end.

    python -m kvgrid.bench.gpu.smoke --out $OUT/smoke --jobs 3      # one H200: ~4 min
    python -m kvgrid.bench.gpu.smoke --only store,guided             # a subset

Each benchmark runs as its own process (``python -m kvgrid.bench.gpu.NAME``, the smoke
arguments below), in ``--jobs`` lanes at once: the 8B engine benchmark in one lane, the rest,
at small shapes and fixed KV pools so that they fit beside it, in the others. Its output goes to
``--out/NAME/`` (``log.txt`` and its JSON). A benchmark whose packages are missing (the
servers' ``fastapi``/``uvicorn``/``zmq``, Ray) is reported as skipped, naming them. Numbers
from a smoke run are not measurements: lanes share the GPU. Prints a table last and writes
``smoke.json``; exits non-zero if any benchmark failed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from kvgrid.bench.gpu import harness
from kvgrid.bench.gpu.harness import add_common_args, log, markdown_table, versions

SERVER = ("fastapi", "uvicorn", "zmq", "httpx")
STORE_ROOT = Path(tempfile.gettempdir()) / "kvgrid-smoke-store"
SMALL = "--shape smollm2-135m"
DUMMY = "--model smollm2-135m --load-format dummy"
TRACE = Path(__file__).resolve().parents[3] / "bench" / "data" / "mooncake_conversation_slice.jsonl"


@dataclass(frozen=True)
class Smoke:
    args: str  # its arguments; {out} is its folder
    needs: tuple[str, ...] = ()  # packages beyond torch
    limit_s: int = 120


# in lane order: the longest first
SMOKES: dict[str, Smoke] = {
    "engine": Smoke(
        "--phases env,kernels,correct,B,C,A,sync,hf --num-requests 8 --hf-deadline-s 15 "
        "--num-kv-blocks 1200",
        ("transformers",),
        330,
    ),
    "store": Smoke(
        f"{SMALL} --phases env,correct,ttft,split,enc,replay --sizes 1024,2048 "
        "--num-kv-blocks 400 --g2-gib 1 --auto-reps 1 --enc-reps 1 --replay-limit 16 "
        "--replay-cap-s 20 --replay-g1-blocks 60 --replay-g2-gib 1 --replay-max-input 1024 "
        f"--budget-s 150 --root {STORE_ROOT}",
        ("cryptography", "zstandard"),
        240,
    ),
    "plot_store": Smoke("{out}/../store/gpu_store.json", ("matplotlib",), 60),
    "serve_replay": Smoke(
        f"{DUMMY} --vocab 49152 --speeds 4 --limit 12 --max-input 256 --num-kv-blocks 64 "
        "--g2-gb 1 --g3-gb 2 --out {out}",
        SERVER,
        180,
    ),
    "disagg": Smoke("--tiny", (*SERVER, "cryptography"), 180),
    "ray_serve": Smoke(
        "--model smollm2-135m --limit 12 --concurrency 4 --warmup 2 "
        f"--workload mooncake:{TRACE},tokens_per_block=128,max_input_tokens=768,"
        "max_output_tokens=128 "  # within the servers' --max-model-len
        "--serve-arg=--max-model-len=1024 --serve-arg=--num-kv-blocks=64 --out {out}",
        (*SERVER, "ray"),
        240,
    ),
    "gemv": Smoke("--ms 1"),
    "decode_attn": Smoke("--cases 1x1280,16x1024", (), 90),
    "mixed_step": Smoke(f"{SMALL} --quick --no-profile --num-kv-blocks 256"),
    "guided": Smoke("--tiny --reps 1 --out {out}", ("llguidance", "tokenizers")),
    "engine_offline": Smoke(
        f"{DUMMY} --num-requests 16 --input-len 64 256 --output-len 16 64 --num-kv-blocks 256 "
        "--out {out}/engine_bench.json"
    ),
    "writeback_copy": Smoke("--block-mib 1 --reps 3 --out {out}"),
    "profile_store_write": Smoke(
        f"--blocks 8 --threads 1,2 --root {tempfile.gettempdir()} "
        "--out {out}/store_write_profile.json",
        ("cryptography", "zstandard"),
        90,
    ),
    "profile_g3_load": Smoke(
        f"--blocks 8 --threads 1,2 --root {STORE_ROOT / 'r'}", ("cryptography", "zstandard"), 90
    ),
    "profile_disk_lookup": Smoke(
        f"--seconds 1 --object-mb 1 --dir {tempfile.gettempdir()} --out {{out}}/lookup.json"
    ),
    "profile_gil": Smoke(
        f"--blocks 16 --block-mb 0.25 --workers 1,2 --seconds 1 --dir {tempfile.gettempdir()} "
        "--out {out}/gil.json",
        ("cryptography",),
    ),
    "bf16_error_budget": Smoke(""),
}
# not in the smoke: bf16_floor_trained needs the default model's trained weights (a download)


def missing(packages: tuple[str, ...]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


def stop(proc: subprocess.Popen) -> None:
    """SIGINT first (its own clean-up stops the servers and Ray nodes it started), then the
    whole group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_one(name: str, out: Path, deadline: float) -> dict:
    smoke = SMOKES[name]
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    left = deadline - time.monotonic()
    if left < 10:
        return {"bench": name, "status": "skipped", "reason": "time budget (--budget-s)"}
    lacks = missing(smoke.needs)
    if lacks:
        log(f"{name}: skipped, missing {', '.join(lacks)}")
        return {"bench": name, "status": "skipped", "reason": f"missing {', '.join(lacks)}"}
    argv = [a.replace("{out}", str(folder)) for a in smoke.args.split()]
    cmd = [sys.executable, "-m", f"kvgrid.bench.gpu.{name}", *argv]
    env = {**os.environ, "OUT": str(folder), "PYTHONUNBUFFERED": "1"}
    log(f"{name}: start ({' '.join(cmd[1:])})")
    t0 = time.perf_counter()
    with open(folder / "log.txt", "w") as f:
        # its own process group: what it started goes with it when it runs out of time
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=min(smoke.limit_s, left))
        except subprocess.TimeoutExpired:
            rc = None
            stop(proc)
    wall = time.perf_counter() - t0
    tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or [""]
    status = "ok" if rc == 0 else ("timeout" if rc is None else f"rc {rc}")
    log(f"{name}: {status} in {wall:.0f}s")
    return {"bench": name, "status": status, "seconds": round(wall, 1), "last_line": tail[0][:160],
            "command": " ".join(["python", "-m", f"kvgrid.bench.gpu.{name}", *argv])}  # fmt: skip


def lanes(names: list[str], jobs: int) -> list[list[str]]:
    """The engine benchmark alone in the first lane; the rest spread over the others, in
    order (plot_store after store, in the same lane)."""
    first = [n for n in names if n == "engine"]
    rest = [n for n in names if n != "engine"]
    k = max(1, jobs - 1) if first else max(1, jobs)
    out = [first] if first else []
    out += [rest[i::k] for i in range(k)]
    for lane in out:  # plot_store reads store's JSON: keep them together, store first
        if "plot_store" in lane and "store" in names and "store" not in lane:
            lane.remove("plot_store")
            next(ln for ln in out if "store" in ln).append("plot_store")
    return [ln for ln in out if ln]


def main(argv: list[str] | None = None) -> int:
    ap = harness.parser("kvgrid.bench.gpu.smoke", __doc__)
    add_common_args(ap)
    ap.add_argument("--jobs", type=int, default=1, help="benchmarks run at once")
    ap.add_argument("--only", default="", help="comma-separated names (default all)")
    ap.add_argument("--skip", default="", help="comma-separated names to leave out")
    ap.add_argument(
        "--budget-s", type=float, default=540.0, help="no benchmark runs past this (skipped)"
    )
    args = ap.parse_args(argv)
    names = [n for n in (args.only.split(",") if args.only else SMOKES) if n]
    if unknown := set(names) - set(SMOKES):
        ap.error(f"unknown --only {sorted(unknown)}: choose from {', '.join(SMOKES)}")
    names = [n for n in names if n not in set(args.skip.split(","))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + args.budget_s

    def lane(ns: list[str]) -> list[dict]:
        return [run_one(n, out, deadline) for n in ns]

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as ex:
        rows = [r for rs in ex.map(lane, lanes(names, args.jobs)) for r in rs]
    rows.sort(key=lambda r: names.index(r["bench"]))
    res = {"versions": versions(), "wall_s": round(time.perf_counter() - t0, 1), "runs": rows}
    (out / "smoke.json").write_text(json.dumps(res, indent=1))
    table = [
        [r["bench"], r["status"], r.get("seconds", ""), r.get("last_line", r.get("reason", ""))]
        for r in rows
    ]
    print(markdown_table(["bench", "status", "s", "last line / reason"], table))
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} ok, wall {res['wall_s']} s")
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
