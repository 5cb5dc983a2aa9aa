"""The engine benchmark's env phase (versions; device copy bandwidth and bf16 matmul rate
measured here, the two roofline ceilings; host->GPU copy rates; idle power) and its tests
phase (the GPU test files under pytest).

    python -m kvgrid.bench.gpu.engine_env --phases env,tests
"""

from __future__ import annotations

import subprocess
import sys
import time

import torch

from kvgrid.bench.gpu import engine_common as common
from kvgrid.bench.gpu.harness import DEV, GPU, bench_ms, log, versions


def phase_env(args) -> dict:

    if not GPU:
        return {
            "device": "cpu",
            "copy_bw_GBps": 10.0,
            "matmul_TFLOPs": 0.1,
            "torch": torch.__version__,
        }
    env = versions()
    # ceiling 1: device-to-device copy, bytes read + written
    n = 2 * 2**30
    src = torch.randn(n // 4, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), reps=20)
    env["copy_bw_GBps"] = 2 * n / ms / 1e6
    # ceiling 2: bf16 matrix product on random data
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench_ms(lambda: a @ b, reps=20)
    env["matmul_TFLOPs"] = 2 * 8192**3 / ms / 1e9
    # host to GPU, pinned and pageable (the G2 tier's copy rate)
    host = torch.empty(2**28, dtype=torch.float32).pin_memory()  # 1 GiB
    gpu = torch.empty(2**28, dtype=torch.float32, device=DEV)
    env["h2d_pinned_GBps"] = 2**30 / bench_ms(lambda: gpu.copy_(host, non_blocking=True), 10) / 1e6
    pageable = torch.ones(2**28, dtype=torch.float32)
    env["h2d_pageable_GBps"] = 2**30 / bench_ms(lambda: gpu.copy_(pageable), 5) / 1e6
    try:  # idle board power, before any work of ours (NVML, milliwatts)
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        time.sleep(1.0)
        env["idle_power_w"] = pynvml.nvmlDeviceGetPowerUsage(h) / 1e3
    except Exception as e:
        env["idle_power_w"] = None
        log("NVML power unavailable:", e)
    return env


def phase_tests(args) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/layers/test_attention.py",
            "tests/engine/test_cuda_graphs.py",
            "tests/layers/test_fused_ops.py",
            "tests/layers/test_gemv.py",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = p.stdout.strip().splitlines()[-15:]
    print("\n".join(tail), flush=True)
    return {
        "rc": p.returncode,
        "summary": tail[-1] if tail else "",
        "seconds": time.perf_counter() - t0,
    }


def run(b: common.Bench) -> None:
    # every engine phase reads the ceilings: env always runs
    b.results.run_phase("env", phase_env, b.args)
    log(b.results.phases.get("env"))
    if b.wants("tests"):
        b.results.run_phase("tests", phase_tests, b.args)


def rows(P: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    env = P.get("env", {})
    if env:
        rows.append(
            (
                "ceilings",
                f"copy {env['copy_bw_GBps']:.0f} GB/s, bf16 mm {env['matmul_TFLOPs']:.0f} TFLOP/s",
                "",
            )
        )
    if "tests" in P:
        rows.append(("GPU tests", P["tests"]["summary"], ""))
    return rows


def main(argv: list[str] | None = None) -> int:
    return common.main(argv, [sys.modules[__name__]], "env,tests")


if __name__ == "__main__":
    sys.exit(main())
