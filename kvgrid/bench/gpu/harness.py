"""What every GPU benchmark shares: the device, timing, the hardware and version stamp, common
flags, result JSON and the closing table.

A benchmark module defines ``main(argv) -> int``; its results go to ``--out`` (default
``$OUT``, else ``./out``) as one JSON file, rewritten after every phase so that a run cut short
still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from kvgrid import envs

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEV.type == "cuda"
GiB = 1 << 30
T_START = time.perf_counter()


def log(*a: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T_START:6.1f}s]", *a, flush=True)


def sync() -> None:
    if GPU:
        torch.cuda.synchronize()


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN of nothing."""
    if not xs:
        return float("nan")
    return float(torch.tensor(xs, dtype=torch.float64).quantile(q / 100))


def bench_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` timed with CUDA events (one wall-clock run on the CPU)."""
    if not GPU:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def default_shape(gpu: str = "llama3.1-8b", cpu: str = "smollm2-135m") -> str:
    """The model shape a benchmark runs by default: an 8B shape on a GPU, a small one on the
    CPU; ``KVGRID_BENCH_SHAPE`` overrides both."""
    return envs.KVGRID_BENCH_SHAPE.get() or (gpu if GPU else cpu)


def parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser: named as run (``python -m module``), its docstring as
    the help text, line breaks kept."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_common_args(
    ap: argparse.ArgumentParser, *, shape: str | None = None, reps: int | None = None
) -> None:
    """--out, --shape and --load-format (and --warmup/--reps where ``reps`` is given)."""
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "out")),
        help="folder for the result JSON (default $OUT, else ./out)",
    )
    if shape is not None:
        ap.add_argument(
            "--shape",
            default=shape,
            help="model shape (kvgrid.models.shapes) or path; default $KVGRID_BENCH_SHAPE, "
            "else an 8B shape on a GPU and a small one on the CPU",
        )
        ap.add_argument("--load-format", default="dummy", help="dummy: random weights of the shape")
    if reps is not None:
        ap.add_argument("--warmup", type=int, default=3, help="untimed runs before timing")
        ap.add_argument("--reps", type=int, default=reps, help="timed runs (median reported)")


def versions() -> dict[str, Any]:
    """The hardware and software a number was measured on."""
    env: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if GPU else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # not installed: the stamp says so
            env[name] = None
    if GPU:
        props = torch.cuda.get_device_properties(DEV)
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / GiB, 1)
        try:
            smi = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                    "--format=csv,noheader",
                ],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["nvidia_smi"] = smi.stdout.strip()
        except Exception as e:
            env["nvidia_smi"] = repr(e)
    return env


class Results:
    """One benchmark's result document: phases, errors, notes, the command and the stamp;
    saved to its path after every phase. Made at import (phases write into it), pointed at
    its file by ``start``."""

    def __init__(self, filename: str) -> None:
        self.path = Path(os.environ.get("OUT", "out")) / filename
        self.data: dict[str, Any] = {"phases": {}, "errors": {}, "notes": []}

    def start(self, out: Path, module: str, argv: list[str] | None = None) -> None:
        self.path = Path(out) / self.path.name
        args = sys.argv[1:] if argv is None else argv
        self.data["command"] = " ".join(["python3", "-m", module, *args])
        self.data["versions"] = versions()

    @property
    def phases(self) -> dict[str, Any]:
        return self.data["phases"]

    @property
    def errors(self) -> dict[str, str]:
        return self.data["errors"]

    @property
    def notes(self) -> list[str]:
        return self.data["notes"]

    def run_phase(self, name: str, fn: Callable[..., Any], *a: Any) -> Any:
        """Run one phase, keep its result or its traceback, save; return the result or None."""
        log(f"==== phase {name}")
        t0 = time.perf_counter()
        try:
            self.phases[name] = fn(*a)
        except Exception as e:
            self.errors[name] = "".join(traceback.format_exception(e))[-3000:]
            log(f"phase {name} failed:\n{self.errors[name]}")
        log(f"{name} took {time.perf_counter() - t0:.1f}s")
        self.save()
        return self.phases.get(name)

    def save(self) -> Path:
        self.data["elapsed_s"] = time.perf_counter() - T_START
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        return self.path


def print_rows(rows: Iterable[tuple[str, str, str]], width: int = 16) -> str:
    """The closing table: one line per measure (name, value, comparison)."""
    text = "\n".join(f"{name:<{width}} {val}  {note}".rstrip() for name, val, note in rows)
    print("\n" + "=" * 100 + "\n" + text, flush=True)
    return text


def markdown_table(header: list[str], rows: Iterable[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
