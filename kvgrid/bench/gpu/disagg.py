"""GPU benchmark of disaggregated serving, in one command: two engine processes share one GPU, a
prefill worker and a decode worker, each with its share of memory (its own KV blocks).

    python -m kvgrid.bench.gpu.disagg           # Llama-3-8B shape, random bf16 weights
    python -m kvgrid.bench.gpu.disagg --tiny    # CPU smoke test at tiny sizes

Phases, each written to $OUT/gpu_disagg.json (or ./out/) as it ends:
- start: two `kvgrid worker` processes (W0, W1), one after the other, each with
  --num-kv-blocks of G1 and --host-gb of pinned G2; their roles are set per phase (POST /role).
- raw: what moving bytes between the two processes costs without kvgrid's object path: the
  authenticated transfer channel carrying raw bytes (no format, no verification: `probe`),
  and, on a GPU, a CUDA IPC device-to-device copy between two processes (`ipc`).
- transfer: W0 prefill -> W1 decode (`--disagg always`), isolated long prompts: per transfer
  the KV bytes, the stream's time and bandwidth, the bandwidth the receiver measured while
  blocks queued, and the tail after the prefill ended, set against the tail the transfer
  time model predicts with those measured parameters (the model the router and simulator
  use: kvgrid.transfer.model).
- mixed, three times with the same two processes: "both" (both workers prefill and decode,
  no disaggregation), "disagg" (W0 prefill, W1 decode, `--disagg auto`: decided per
  request) and "disagg-always" (the same pools, every prompt prefilled on W0): --decoders streams decode while --long-count long prompts arrive every
  --long-interval-s. Inter-token latency of the decoding streams while long prompts are in
  the system (p50/p99), time to first token of the long prompts (p50/p90), the router's
  decisions by reason, transfers by outcome.
A table is printed last.
"""

# ruff: noqa: E501  (table rows are long)
from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import httpx
import numpy as np

from kvgrid import envs
from kvgrid.bench.gpu.harness import add_common_args
from kvgrid.bench.procs import interrupt
from kvgrid.server.auth import ControlKey

# the control plane: routers hold the cluster key, each worker its own key
CLUSTER = ControlKey.generate()
# every router of the run: one server secret (a worker serves one secret's tenant scopes)
SERVER_SECRET = os.urandom(32).hex()
ADMIN_TOKEN = os.urandom(16).hex()
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# one tenant whose concurrency the frontend does not cap (the local tenant's default is 32)
API_KEYS = {"keys": {"sk-bench": {"tenant": "bench", "max_concurrent": 4096}}}
CLIENT = {"Authorization": "Bearer sk-bench"}
T0 = time.monotonic()


def H(w: dict | str) -> dict:
    """What the router sends a worker (a worker's dict or its name): its token."""
    return CLUSTER.router_headers(w if isinstance(w, str) else w["name"])


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process with its log; stopped (SIGINT, then SIGKILL) at the end."""

    live: ClassVar[list[Proc]] = []

    def __init__(self, name: str, argv: list[str], out: Path, key: ControlKey) -> None:
        env = dict(os.environ)
        env.update(
            {
                envs.KVGRID_CONTROL_KEY.name: key.dumps(),
                envs.KVGRID_ADMIN_TOKEN.name: ADMIN_TOKEN,
                envs.KVGRID_LOG.name: "WARNING",
                envs.KVGRID_API_KEYS.name: json.dumps(API_KEYS),
                envs.KVGRID_SERVER_SECRET.name: SERVER_SECRET,
            }
        )
        env.pop(envs.KVGRID_CONTROL_KEY_FILE.name, None)
        self.log = out / f"{name}.log"
        with open(self.log, "w") as f:
            self.p = subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
        Proc.live.append(self)

    def stop(self) -> None:
        interrupt(self.p, 30)


def wait_for(check, timeout: float, what: str, proc: Proc | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"{what}: process exited\n{proc.log.read_text()[-3000:]}")
        try:
            got = check()
            if got:
                return got
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready in {timeout}s")


def start_worker(args, name: str, out: Path) -> dict:
    port = free_port()
    argv = [sys.executable, "-m", "kvgrid.cli", "worker", "--host", "127.0.0.1", "--port", str(port),
            "--worker-id", name, "--model", args.model, "--load-format", args.load_format,
            "--num-kv-blocks", str(args.num_kv_blocks), "--kv-store-host-gb", str(args.host_gb),
            "--kv-store-disk-gb", "0", "--max-num-batched-tokens", str(args.max_batched),
            "--max-model-len", str(args.max_model_len), "--block-size", str(args.block_size)]  # fmt: skip
    if args.threads:
        argv += ["--threads", str(args.threads)]
    proc = Proc(name, argv, out, CLUSTER.for_worker(name))
    url = f"http://127.0.0.1:{port}"
    t = time.monotonic()
    info = wait_for(
        lambda: httpx.get(f"{url}/info", headers=H(name), timeout=5).json(), 600, name, proc
    )
    wait_for(lambda: httpx.get(f"{url}/health", timeout=5).status_code == 200, 600, name, proc)
    say(f"{name} ready in {time.monotonic() - t:.1f}s, transfers on {info['transfer_endpoint']}")
    return {"name": name, "url": url, "endpoint": info["transfer_endpoint"], "proc": proc}


def start_router(args, workers: list[dict], mode: str, out: Path) -> tuple[Proc, str]:
    port = free_port()
    argv = [sys.executable, "-m", "kvgrid.cli", "router", "--host", "127.0.0.1", "--port", str(port),
            "--model", args.model, "--load-format", args.load_format, "--disagg", mode,
            "--max-concurrent", "4096", "--itl-target", str(args.itl_target)]  # fmt: skip
    for w in workers:
        argv += ["--worker", w["url"]]
    proc = Proc(f"router-{mode}", argv, out, CLUSTER)
    url = f"http://127.0.0.1:{port}"

    def ready():
        ws = httpx.get(f"{url}/debug/router", headers=ADMIN, timeout=5).json()["workers"]
        return len(ws) == len(workers) and all(
            w["up"] and w["freshness"] == "exact" for w in ws.values()
        )

    wait_for(ready, 120, f"router ({mode})", proc)
    return proc, url


def set_roles(workers: list[dict], roles: list[str]) -> None:
    for w, role in zip(workers, roles):
        r = httpx.post(f"{w['url']}/role", json={"role": role}, headers=H(w), timeout=10)
        r.raise_for_status()
    time.sleep(1.2)  # the next load reports carry the roles to any router


def tstate(w: dict) -> dict:
    return httpx.get(f"{w['url']}/debug/transfers", headers=H(w), timeout=10).json()


async def stream(client: httpx.AsyncClient, url: str, ids: list[int], n: int, rec: dict) -> None:
    """One streamed completion: the arrival time of each token chunk."""
    body = {"prompt": ids, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True}
    rec["t0"], rec["times"] = time.monotonic(), []
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=CLIENT) as r:
        rec["worker"] = r.headers.get("x-kvgrid-worker")
        rec["prefill_worker"] = r.headers.get("x-kvgrid-prefill-worker")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                rec["error"] = obj["error"]
                return
            if obj.get("choices"):
                rec["times"].append(time.monotonic())


def pct(xs, p) -> float | None:
    return float(np.percentile(xs, p)) if len(xs) else None


def prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


async def mixed(args, url: str, seed: int) -> dict:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        dec = [{} for _ in range(args.decoders)]
        tasks = []
        for rec in dec:
            tasks.append(
                asyncio.create_task(
                    stream(
                        client, url, prompt(rng, args.decode_prompt), args.decode_max_tokens, rec
                    )
                )
            )
            await asyncio.sleep(args.decode_stagger_s)
        t = time.monotonic()
        while time.monotonic() - t < 120 and not all(len(r.get("times", ())) >= 2 for r in dec):
            await asyncio.sleep(0.05)
        await asyncio.sleep(args.settle_s)
        longs = [{} for _ in range(args.long_count)]
        w0 = time.monotonic()
        lt = []
        for rec in longs:
            lt.append(
                asyncio.create_task(
                    stream(client, url, prompt(rng, args.long_tokens), args.long_out, rec)
                )
            )
            await asyncio.sleep(rng.expovariate(1 / args.long_interval_s))
        await asyncio.gather(*lt)
        w1 = time.monotonic()
        for t_ in tasks:
            t_.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    itl = []
    for r in dec:
        ts = np.array(r.get("times", ()))
        gaps = np.diff(ts)
        inside = (ts[1:] >= w0) & (ts[:-1] <= w1) if len(ts) > 1 else np.array([], bool)
        itl.extend(gaps[inside].tolist())
    ttft = [r["times"][0] - r["t0"] for r in longs if r.get("times")]
    errors = [r["error"] for r in dec + longs if "error" in r]
    return {
        "window_s": w1 - w0,
        "itl_n": len(itl),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "itl_max_s": max(itl) if itl else None,
        "ttft_long_p50_s": pct(ttft, 50),
        "ttft_long_p90_s": pct(ttft, 90),
        "ttft_long_max_s": max(ttft) if ttft else None,
        "long_done": len(ttft),
        "long_remote": sum(1 for r in longs if r.get("prefill_worker")),
        "errors": errors[:5],
    }


def run_mixed(args, workers, out, name: str, roles: list[str], mode: str, seed: int) -> dict:
    set_roles(workers, roles)
    before = [tstate(w)["receiver"]["outcomes"] for w in workers]
    router, url = start_router(args, workers, mode, out)
    try:
        res = asyncio.run(mixed(args, url, seed))
        state = httpx.get(f"{url}/debug/router", headers=ADMIN, timeout=10).json()
        res["decisions"] = state["prefill_decisions"]
    finally:
        router.stop()
    after = [tstate(w)["receiver"]["outcomes"] for w in workers]
    res["transfers"] = {
        k: sum(a.get(k, 0) - b.get(k, 0) for a, b in zip(after, before))
        for k in set().union(*after)
    }
    res.update(roles=roles, mode=mode)
    say(f"mixed {name}: {json.dumps(res)}")
    return res


def run_transfer(args, workers, out) -> dict:
    from kvgrid.transfer.model import TransferModel

    set_roles(workers, ["prefill", "decode"])
    router, url = start_router(args, workers, "always", out)
    rng = random.Random(7)
    try:
        with httpx.Client(timeout=600, headers=CLIENT) as c:
            for _ in range(args.isolated):
                c.post(
                    f"{url}/v1/completions",
                    json={
                        "prompt": prompt(rng, args.long_tokens),
                        "max_tokens": 2,
                        "ignore_eos": True,
                    },
                ).raise_for_status()
    finally:
        router.stop()
    recv, send = tstate(workers[1])["receiver"], tstate(workers[0])["sender"]
    rows = []
    bpb = args.block_size * args.kv_bytes_per_token
    per_step = args.max_batched // args.block_size
    model = TransferModel(recv["bytes_per_s"] or 1.0, send["setup_s"] or 0.0)
    sent = {s["transfer_id"]: s for s in send["recent"]}
    pairs = [(r, sent[r["transfer_id"]]) for r in recv["recent"] if r["transfer_id"] in sent]
    for r, s in pairs[-args.isolated :]:
        predicted = model.tail_s(s["blocks"], bpb, s["prefill_s"] or 0.0, per_step)
        rows.append({
            "outcome": r["outcome"], "blocks": r["landed_blocks"], "bytes": r["bytes"],
            "stream_s": r["stream_s"], "stream_GBps": r["bytes"] / r["stream_s"] / 1e9 if r["stream_s"] else None,
            "prefill_s": s["prefill_s"], "tail_s": s["tail_s"], "tail_predicted_s": predicted,
        })  # fmt: skip
    res = {
        "per_transfer": rows,
        "receiver_bytes_per_s": recv["bytes_per_s"],
        "setup_s": send["setup_s"],
    }
    say(f"transfer: {json.dumps(res)}")
    return res


def ipc_copy(nbytes: int, reps: int = 10) -> dict | None:
    """A device-to-device copy between two processes through CUDA IPC (the fastest raw path
    between two processes on one GPU)."""
    import torch
    import torch.multiprocessing as mp

    if not torch.cuda.is_available():
        return None
    ctx = mp.get_context("spawn")
    q, back = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(q, back, reps))
    child.start()
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    q.put(src)
    seconds = back.get(timeout=120)
    q.put(None)
    child.join(60)
    return {"bytes": nbytes, "seconds": seconds, "GBps": nbytes / seconds / 1e9}


def _ipc_child(q, back, reps: int) -> None:
    import torch

    src = q.get()
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src)
    torch.cuda.synchronize()
    back.put((time.perf_counter() - t) / reps)
    q.get()


# the same two processes: both do everything; prefill/decode pools decided per request;
# the same pools with every prompt prefilled on the prefill worker
MIXED = (
    ("both", ["both", "both"], "never"),
    ("disagg", ["prefill", "decode"], "auto"),
    ("disagg-always", ["prefill", "decode"], "always"),
)


def table(res: dict) -> str:
    m = res.get("mixed", {})
    rows = [
        "| config | ITL p50 / p99 ms | TTFT long p50 / p90 s | long remote | transfers |",
        "|---|---|---|---|---|",
    ]
    for k, _, _ in MIXED:
        r = m.get(k)
        if not r:
            continue
        f = lambda x, s=1e3: f"{x * s:.1f}" if x is not None else "-"
        rows.append(
            f"| {k} | {f(r['itl_p50_s'])} / {f(r['itl_p99_s'])} | {f(r['ttft_long_p50_s'], 1)} / {f(r['ttft_long_p90_s'], 1)} | {r['long_remote']}/{r['long_done']} | {r['transfers']} |"
        )
    t = res.get("transfer", {}).get("per_transfer", [])
    raw = res.get("raw", {})
    if res.get("failed"):
        rows.append(f"failed phases: {', '.join(res['failed'])} (tracebacks in the JSON)")
    if t:
        bw = [x["stream_GBps"] for x in t if x["stream_GBps"]]
        rows.append("")
        rows.append(
            f"transfer: stream {np.median(bw):.2f} GB/s (median of {len(bw)}), receiver-measured {res['transfer']['receiver_bytes_per_s'] / 1e9:.2f} GB/s; "
            f"raw channel {raw.get('probe', {}).get('bytes_per_s', 0) / 1e9:.2f} GB/s; CUDA IPC {(raw.get('ipc') or {}).get('GBps', 0):.0f} GB/s"
        )
        rows.append(
            "tail after prefill, measured vs model (ms): "
            + ", ".join(
                f"{x['tail_s'] * 1e3:.1f}/{x['tail_predicted_s'] * 1e3:.1f}"
                for x in t
                if x["tail_s"] is not None
            )
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kvgrid.bench.gpu.disagg", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--tiny", action="store_true", help="CPU smoke sizes (SmolLM2 shape)")
    add_common_args(ap)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--num-kv-blocks", type=int, default=4096, help="G1 blocks per worker")
    ap.add_argument("--host-gb", type=float, default=8.0, help="G2 per worker")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--max-batched", type=int, default=2048)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--kv-bytes-per-token", type=int, default=131072)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--decoders", type=int, default=48)
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--decode-max-tokens", type=int, default=3000)
    ap.add_argument("--decode-stagger-s", type=float, default=0.02)
    ap.add_argument("--settle-s", type=float, default=2.0)
    ap.add_argument("--long-tokens", type=int, default=7680)
    ap.add_argument("--long-count", type=int, default=16)
    ap.add_argument("--long-interval-s", type=float, default=0.75)
    ap.add_argument("--long-out", type=int, default=32)
    ap.add_argument("--itl-target", type=float, default=0.03)
    ap.add_argument("--isolated", type=int, default=4)
    ap.add_argument("--probe-bytes", type=int, default=4 << 30)
    ap.add_argument("--phases", default="raw,transfer,mixed")
    args = ap.parse_args(argv)
    if args.tiny:
        args.model, args.load_format, args.block_size, args.max_batched = (
            "smollm2-135m",
            "dummy",
            16,
            128,
        )
        args.num_kv_blocks, args.host_gb, args.max_model_len, args.threads = 512, 0.25, 1024, 1
        args.kv_bytes_per_token = 30 * 2 * 3 * 64 * 4
        args.decoders, args.decode_prompt, args.decode_max_tokens, args.settle_s = 3, 32, 200, 0.5
        args.long_tokens, args.long_count, args.long_interval_s, args.long_out = 400, 3, 0.5, 4
        args.isolated, args.probe_bytes, args.itl_target = 2, 64 << 20, 0.5
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args)}

    def save() -> None:
        (out / "gpu_disagg.json").write_text(json.dumps(res, indent=1, default=str))

    phases = args.phases.split(",")
    workers: list[dict] = []

    def phase(name: str, fn) -> None:
        """One phase; a failure is recorded and the next phase still runs."""
        try:
            fn()
        except Exception as e:  # one broken phase must not cost the others' numbers
            import traceback

            res.setdefault("failed", {})[name] = traceback.format_exc()
            say(f"phase {name} failed: {e!r}")
        save()

    def raw() -> None:
        res["raw"] = {}
        # the receiver expects the probe; the sender proves it with the ticket the cluster
        # key grants for it (as the router grants a transfer's)
        pid = os.urandom(16)
        sender, receiver = workers
        httpx.post(
            f"{receiver['url']}/transfer/probe/expect",
            json={"probe_id": pid.hex()},
            headers=H(receiver),
            timeout=30,
        ).raise_for_status()
        res["raw"]["probe"] = httpx.post(
            f"{sender['url']}/transfer/probe",
            json={
                "endpoint": receiver["endpoint"],
                "bytes": args.probe_bytes,
                "probe_id": pid.hex(),
                "ticket": CLUSTER.transfer_ticket(receiver["name"], pid).hex(),
            },
            headers=H(sender),
            timeout=600,
        ).json()
        res["raw"]["ipc"] = ipc_copy(min(args.probe_bytes, 1 << 30))
        say(f"raw: {json.dumps(res['raw'])}")

    def transfer() -> None:
        res["transfer"] = run_transfer(args, workers, out)

    def mixed_one(i: int, name: str, roles: list[str], mode: str) -> None:
        res["mixed"][name] = run_mixed(args, workers, out, name, roles, mode, i + 1)

    def mixed_all() -> None:
        res["mixed"] = {}
        for i, (name, roles, mode) in enumerate(MIXED):
            phase(name, functools.partial(mixed_one, i, name, roles, mode))

    try:
        workers = [start_worker(args, f"W{i}", out) for i in range(2)]
        res["start_s"] = time.monotonic() - T0
        for name, fn in (("raw", raw), ("transfer", transfer), ("mixed", mixed_all)):
            if name in phases:
                phase(name, fn)
        res["leftover"] = {w["name"]: tstate(w) for w in workers}
        res["elapsed_s"] = time.monotonic() - T0
        save()
    finally:
        for p in reversed(Proc.live):
            p.stop()
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
