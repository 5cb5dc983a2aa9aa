"""`kvgrid serve`: the whole system on one machine, frontend plus N worker processes.

Each worker is its own process (`kvgrid worker`), started and restarted by a small
supervisor thread; the frontend finds them by URL and they rejoin after a restart. On more
than one machine, run `kvgrid worker` and `kvgrid router` under a real cluster manager.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# engine flags passed through to each worker: (dest, flag, is_switch)
_ENGINE_FLAGS = (
    ("model", "--model", False),
    ("load_format", "--load-format", False),
    ("dtype", "--dtype", False),
    ("device", "--device", False),
    ("block_size", "--block-size", False),
    ("num_kv_blocks", "--num-kv-blocks", False),
    ("kv_cache_memory_gb", "--kv-cache-memory-gb", False),
    ("gpu_memory_utilization", "--gpu-memory-utilization", False),
    ("max_model_len", "--max-model-len", False),
    ("max_num_seqs", "--max-num-seqs", False),
    ("max_num_batched_tokens", "--max-num-batched-tokens", False),
    ("no_prefix_caching", "--no-prefix-caching", True),
    ("attention_backend", "--attention-backend", False),
    ("no_cuda_graphs", "--no-cuda-graphs", True),
    ("seed", "--seed", False),
    ("served_model_name", "--served-model-name", False),
)


def worker_argv(args: argparse.Namespace, worker_id: str, port: int, threads: int) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "kvgrid.cli",
        "worker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-id",
        worker_id,
        "--threads",
        str(threads),
    ]
    for dest, flag, switch in _ENGINE_FLAGS:
        v = getattr(args, dest, None)
        if switch:
            if v:
                argv.append(flag)
        elif v is not None:
            argv += [flag, str(v)]
    return argv


class Supervisor(threading.Thread):
    """Keeps N worker processes running; a crashed one is restarted with backoff."""

    def __init__(self, argvs: list[list[str]], env: dict[str, str] | None = None) -> None:
        super().__init__(name="kvgrid-supervisor", daemon=True)
        self.argvs = argvs
        self.env = env
        self.procs: list[subprocess.Popen | None] = [None] * len(argvs)
        self.restarts = [0] * len(argvs)
        self._stop = threading.Event()

    def start_all(self) -> None:
        for i in range(len(self.argvs)):
            self._spawn(i)
        self.start()

    def _spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.argvs[i], env=self.env)
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)

    def run(self) -> None:
        next_try = [0.0] * len(self.argvs)
        while not self._stop.wait(0.5):
            for i, p in enumerate(self.procs):
                if p is None or p.poll() is None:
                    continue
                now = time.monotonic()
                if next_try[i] == 0.0:
                    delay = min(30.0, 2.0 ** min(self.restarts[i], 5))
                    log.warning(
                        "worker %d exited with %s; restarting in %.0fs", i, p.returncode, delay
                    )
                    next_try[i] = now + delay
                elif now >= next_try[i]:
                    self.restarts[i] += 1
                    next_try[i] = 0.0
                    self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvgrid.server.frontend import build_frontend, create_frontend_app

    logging.basicConfig(
        level=os.environ.get("KVGRID_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.workers < 1:
        print("error: --workers must be at least 1", file=sys.stderr)
        return 2
    try:
        # resolves (and converts, once) the model before the workers start
        fe = build_frontend(
            args.model,
            args.load_format,
            args.served_model_name,
            [],
            args.policy,
            args.api_keys,
            args.max_concurrent,
            log_decisions=args.log_decisions,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = args.host or ("0.0.0.0" if fe.tenants.auth_required else "127.0.0.1")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    ports = [free_port() for _ in range(args.workers)]
    argvs = [worker_argv(args, f"w{i}", p, threads) for i, p in enumerate(ports)]
    for p in ports:
        fe.link.add_url(f"http://127.0.0.1:{p}")
    sup = Supervisor(argvs)
    sup.start_all()
    log.info(
        "kvgrid serve: %s on http://%s:%d with %d worker(s), policy %s",
        fe.config.model_name,
        host,
        args.port,
        args.workers,
        fe.router.policy.name,
    )
    try:
        uvicorn.run(create_frontend_app(fe), host=host, port=args.port, log_level="warning")
    finally:
        sup.stop()
    return 0


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from kvgrid.server.frontend import build_frontend, create_frontend_app

    logging.basicConfig(
        level=os.environ.get("KVGRID_LOG", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        fe = build_frontend(
            args.model,
            args.load_format,
            args.served_model_name,
            args.worker,
            args.policy,
            args.api_keys,
            args.max_concurrent,
            log_decisions=args.log_decisions,
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = args.host or ("0.0.0.0" if fe.tenants.auth_required else "127.0.0.1")
    uvicorn.run(create_frontend_app(fe), host=host, port=args.port, log_level="warning")
    return 0
