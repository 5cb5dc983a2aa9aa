"""`kvgrid serve`: the whole system on one machine, frontend plus N worker processes.

Each worker is its own process (`kvgrid worker`), started and restarted by a small
supervisor thread; the frontend finds them by URL and they rejoin after a restart. On more
than one machine, run `kvgrid worker` and `kvgrid router` under a real cluster manager.

The control plane is authenticated here too: `kvgrid serve` uses the configured cluster
control key or generates one, and hands each worker its own worker key (kvgrid.server.auth)
in its environment. Secrets never go on a command line, where any user of the machine reads
them (``ps``): worker keys and the Redis URL (it may hold a password) travel in the
environment.
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

from kvgrid import envs
from kvgrid.server.auth import (
    ControlKey,
    CredentialError,
    is_loopback_host,
    load_control_key,
)

log = logging.getLogger(__name__)

# a worker that ran this long before it exited is restarted without backoff
HEALTHY_RUN_S = 60.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _engine_flags() -> list[argparse.Action]:
    """Every engine and store flag, read off the parser itself so that a new engine flag
    reaches the workers without being listed twice."""
    from kvgrid.engine.args import add_engine_args

    p = argparse.ArgumentParser(add_help=False)
    add_engine_args(p)
    return [a for a in p._actions if a.option_strings]


def _flag_argv(action: argparse.Action, value) -> list[str]:
    """The arguments that give ``action``'s flag ``value`` (none for None)."""
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):  # ["--x", "--no-x"]
        return [action.option_strings[0 if value else 1]]
    if isinstance(action, argparse._StoreTrueAction):
        return [action.option_strings[0]] if value else []
    return [action.option_strings[0], str(value)]


# flags whose values may hold secrets: passed to workers in the environment, not argv
SECRET_FLAGS = {"kv_store_redis": envs.KVGRID_KV_STORE_REDIS.name}


def worker_env(args: argparse.Namespace, worker_id: str, key: ControlKey | None) -> dict[str, str]:
    """The environment of a worker process: this one's, plus its worker key and the
    secret-bearing flags; a cluster key of ours is not passed on."""
    env = dict(os.environ)
    for var in (envs.KVGRID_CONTROL_KEY.name, envs.KVGRID_CONTROL_KEY_FILE.name):
        env.pop(var, None)
    if key is not None:
        env[envs.KVGRID_CONTROL_KEY.name] = key.for_worker(worker_id).dumps()
    for dest, var in SECRET_FLAGS.items():
        v = getattr(args, dest, None)
        if v is not None:
            env[var] = str(v)
    return env


def worker_argv(
    args: argparse.Namespace, worker_id: str, port: int, threads: int, role: str = "both"
) -> list[str]:
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
        "--exit-with-parent",
        "--role",
        role,
    ]
    if getattr(args, "allow_fault_injection", False):
        argv.append("--allow-fault-injection")
    if getattr(args, "device_group", None):
        argv += ["--device-group", args.device_group]
    if getattr(args, "served_model_name", None):
        argv += ["--served-model-name", args.served_model_name]
    for action in _engine_flags():
        if action.dest in SECRET_FLAGS:
            continue
        v = getattr(args, action.dest, None)
        if action.dest == "kv_store_dir" and v is not None:
            v = os.path.join(v, worker_id)  # one G3 folder per worker: one owner per capacity
        argv += _flag_argv(action, v)
    return argv


class Supervisor(threading.Thread):
    """Keeps worker processes running; a crashed one is restarted with backoff. The
    autoscaler adds slots (``add``) and retires them (``retire``: stopped for good)."""

    def __init__(
        self, argvs: list[list[str]], envs: list[dict[str, str] | None] | None = None
    ) -> None:
        super().__init__(name="kvgrid-supervisor", daemon=True)
        self.argvs = list(argvs)
        self.envs = list(envs) if envs is not None else [None] * len(argvs)
        self.procs: list[subprocess.Popen | None] = [None] * len(argvs)
        self.restarts = [0] * len(argvs)
        self.started = [0.0] * len(argvs)
        self.retired: set[int] = set()
        self._next_try: dict[int, float] = {}
        self._lock = threading.Lock()  # the autoscaler changes slots from another thread
        self._stop = threading.Event()

    def start_all(self) -> None:
        for i in range(len(self.argvs)):
            self._spawn(i)
        self.start()

    def _spawn(self, i: int) -> None:
        self.started[i] = time.monotonic()
        self.procs[i] = subprocess.Popen(self.argvs[i], env=self.envs[i])
        log.info("worker %d started (pid %d)", i, self.procs[i].pid)

    def add(self, argv: list[str], env: dict[str, str] | None = None) -> int:
        """Start one more worker process; returns its slot."""
        with self._lock:
            self.argvs.append(argv)
            self.envs.append(env)
            self.procs.append(None)
            self.restarts.append(0)
            self.started.append(0.0)
            i = len(self.argvs) - 1
            self._spawn(i)
        return i

    def retire(self, i: int, timeout_s: float = 30.0) -> int | None:
        """Stop slot ``i`` for good (SIGTERM, then SIGKILL after ``timeout_s``); blocks until
        it has exited. Returns its exit status."""
        with self._lock:
            self.retired.add(i)
            p = self.procs[i]
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            return p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for i, p in enumerate(self.procs):
                    if i in self.retired or p is None or p.poll() is None:
                        continue
                    now = time.monotonic()
                    if self._next_try.get(i, 0.0) == 0.0:
                        if now - self.started[i] > HEALTHY_RUN_S:
                            self.restarts[i] = 0  # it had been running fine: no backoff
                        delay = min(30.0, 2.0 ** min(self.restarts[i], 5))
                        log.warning(
                            "worker %d exited with %s; restarting in %.0fs", i, p.returncode, delay
                        )
                        self._next_try[i] = now + delay
                    elif now >= self._next_try[i]:
                        self.restarts[i] += 1
                        self._next_try[i] = 0.0
                        self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            procs = list(self.procs)
        for p in procs:
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()


def worker_pools(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(worker id, role) of each worker process `kvgrid serve` starts."""
    pre = getattr(args, "prefill_workers", 0) or 0
    dec = getattr(args, "decode_workers", 0) or 0
    both = args.workers if args.workers is not None else (0 if pre or dec else 1)
    if min(pre, dec, both) < 0:
        raise ValueError("worker counts must be >= 0")
    if both + dec < 1:
        raise ValueError("at least one worker must decode: --workers or --decode-workers")
    return (
        [(f"w{i}", "both") for i in range(both)]
        + [(f"p{i}", "prefill") for i in range(pre)]
        + [(f"d{i}", "decode") for i in range(dec)]
    )


def pool_bounds(args: argparse.Namespace) -> dict[str, tuple[int, int]]:
    """(fewest, most) workers of each role pool `kvgrid serve` may scale ({} without role
    pools); ValueError for bounds that contradict each other or the pools it starts."""
    pools = worker_pools(args)
    roles = {role for _, role in pools}
    if roles == {"both"}:
        for role in ("prefill", "decode"):
            for flag in (f"min_{role}_workers", f"max_{role}_workers"):
                if getattr(args, flag, None) is not None:
                    raise ValueError(
                        f"--{flag.replace('_', '-')} needs role pools: --{role}-workers"
                    )
        return {}
    if "both" in roles:
        if getattr(args, "autoscale", False):
            raise ValueError(
                "--autoscale sizes one pool of workers (--workers) or the role pools "
                "(--prefill-workers, --decode-workers), not both at once"
            )
        return {}  # workers of every kind side by side: only the mixed pool is resized
    floor = getattr(args, "min_workers", 1)
    out = {}
    for role in ("prefill", "decode"):
        have = sum(r == role for _, r in pools)
        lo = getattr(args, f"min_{role}_workers", None)
        hi = getattr(args, f"max_{role}_workers", None)
        lo = min(floor, have) if lo is None else lo
        lo = max(lo, 1) if role == "decode" else max(lo, 0)
        hi = have if hi is None else hi
        if not lo <= have <= hi:
            raise ValueError(
                f"--{role}-workers {have} must lie within --min-{role}-workers {lo} and "
                f"--max-{role}-workers {hi}"
            )
        out[role] = (lo, hi)
    return out


def _default_host(args: argparse.Namespace) -> str:
    keys_set = bool(args.api_keys or envs.KVGRID_API_KEYS.is_set())
    return args.host or ("0.0.0.0" if keys_set else "127.0.0.1")


def _bind_host(args: argparse.Namespace, auth_required: bool) -> str:
    """The frontend's address; ValueError when binding it beyond loopback is not safe."""
    host = _default_host(args)
    if not is_loopback_host(host) and not auth_required and not args.allow_anonymous:
        raise ValueError(
            f"binding {host} without API keys lets anyone who reaches it use this server: "
            "configure --api-keys (or KVGRID_API_KEYS), or pass --allow-anonymous"
        )
    return host


def frontend_host(args: argparse.Namespace) -> str:
    """The frontend's address as the flags and API keys give it; ValueError when binding it
    beyond loopback is not safe."""
    return _bind_host(args, bool(args.api_keys or envs.KVGRID_API_KEYS.is_set()))


def run_serve(args: argparse.Namespace) -> int:

    from kvgrid.server.frontend import create_frontend_app

    try:
        pools = worker_pools(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = len(pools)
    try:
        key = load_control_key(args.control_key_file) or ControlKey.generate()
    except CredentialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # resolves (and converts, once) the model before the workers start
    fe = _frontend_from_args(args, [], key)
    if fe is None:
        return 2
    try:
        bounds = pool_bounds(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if bounds:  # role pools: as many processes as their maxima allow at once
        max_workers = n + sum(
            hi - sum(r == role for _, r in pools) for role, (_, hi) in bounds.items()
        )
    else:
        max_workers = max(n, getattr(args, "max_workers", None) or n)
    # cores are divided among as many processes as may run at once
    threads = args.threads or max(1, (os.cpu_count() or 1) // max_workers)
    ports = [free_port() for _ in range(n)]
    argvs = [worker_argv(args, wid, p, threads, role) for (wid, role), p in zip(pools, ports)]
    for p in ports:
        fe.link.add_url(f"http://127.0.0.1:{p}")
    sup = Supervisor(argvs, [worker_env(args, wid, key) for wid, _ in pools])
    sup.start_all()
    if getattr(args, "autoscale", False) or max_workers > n:
        try:
            fe.autoscaler = _autoscaler(args, fe, sup, pools, ports, threads, max_workers, key)
        except (ValueError, OSError) as e:
            sup.stop()
            print(f"error: {e}", file=sys.stderr)
            return 2
    log.info(
        "kvgrid serve: %s on http://%s:%d with worker(s) %s, policy %s, disaggregation %s",
        fe.config.model_name,
        fe.bind_host,
        args.port,
        ", ".join(f"{wid} ({role})" for wid, role in pools),
        fe.router.policy.name,
        fe.router.disagg.mode,
    )
    try:
        _run_http(create_frontend_app(fe), fe.bind_host, args.port)
    finally:
        sup.stop()
    return 0


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame) -> None:
    raise _Terminated


def _run_http(app, host: str, port: int) -> None:
    """uvicorn.run, where SIGTERM ends it the way Ctrl-C does. uvicorn shuts down on the
    signal and then re-raises it; with the default action that kills the process on the
    spot, skipping the caller's cleanup (``kvgrid serve`` left its workers running). Here
    the re-raised signal unwinds instead."""
    import uvicorn

    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    except _Terminated:
        log.info("SIGTERM: stopping")
    finally:
        signal.signal(signal.SIGTERM, old)


class ProcessLauncher:
    """The autoscaler's launcher (kvgrid.server.autoscale.Launcher) on this machine: worker
    processes under the serve supervisor."""

    def __init__(
        self, args: argparse.Namespace, fe, sup: Supervisor, threads: int, key: ControlKey | None
    ) -> None:
        self.args, self.fe, self.sup, self.threads, self.key = args, fe, sup, threads, key
        self.slots: dict[str, tuple[int, str]] = {}  # worker id -> (supervisor slot, url)

    def adopt(self, worker_id: str, slot: int, url: str):
        from kvgrid.server.autoscale import Replica

        self.slots[worker_id] = (slot, url)
        return Replica(worker_id, url, time.monotonic())

    def launch(self, worker_id: str, role: str = "both"):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        argv = worker_argv(self.args, worker_id, port, self.threads, role)
        slot = self.sup.add(argv, worker_env(self.args, worker_id, self.key))
        self.fe.link.add_url(url)
        return self.adopt(worker_id, slot, url)

    def detach(self, worker_id: str) -> None:
        self.fe.link.forget(self.slots[worker_id][1])

    def retire(self, worker_id: str) -> None:
        self.sup.retire(self.slots[worker_id][0])

    def describe(self, worker_id: str) -> dict:
        slot = self.slots.get(worker_id, (None, None))[0]
        p = self.sup.procs[slot] if slot is not None else None
        restarts = self.sup.restarts[slot] if slot is not None else 0
        return {"slot": slot, "pid": p.pid if p else None, "restarts": restarts}


def _autoscaler(args, fe, sup: Supervisor, pools, ports, threads: int, max_workers: int, key):
    """The planner loop (with --autoscale) and the operator's resize, on this machine:
    ``pools`` and ``ports``, the workers started and where they listen."""
    from kvgrid.server.autoscale import POOL_OF_ROLE, LiveActuator

    bounds = pool_bounds(args)
    launcher = ProcessLauncher(args, fe, sup, threads, key)
    pool_max = {POOL_OF_ROLE[role]: hi for role, (_, hi) in bounds.items()}
    act = LiveActuator(fe, launcher, max_workers, pool_max=pool_max)
    for i, ((wid, role), p) in enumerate(zip(pools, ports)):
        r = launcher.adopt(wid, i, f"http://127.0.0.1:{p}")
        r.role = role
        act.adopt(r)
    return planner_loop(args, act, max_workers)


def planner_loop(args: argparse.Namespace, act, max_workers: int):
    """The Autoscaler (the SLA planner with --autoscale, and the operator's resize) that
    `kvgrid serve`'s scaling flags describe, acting through ``act``."""
    from kvgrid.planner.calibration import load_calibration
    from kvgrid.planner.planner import Planner, PlannerConfig
    from kvgrid.server.autoscale import Autoscaler

    bounds = pool_bounds(args)  # role pools: sized apart, as in the simulator
    cfg = PlannerConfig(
        ttft_target_s=args.ttft_target,
        itl_target_s=args.itl_target,
        min_replicas=max(1, args.min_workers),
        max_replicas=max_workers,
        interval_s=args.autoscale_interval,
        startup_s=args.worker_startup_s,
        cooldown_s=args.scale_down_cooldown,
        down_ticks=args.scale_down_ticks,
        disagg=bool(bounds),
        pool_min={role: lo for role, (lo, _) in bounds.items()},
        pool_max={role: hi for role, (_, hi) in bounds.items()},
    )
    # a calibration file is this machine's measured step times; without one the planner
    # models the workers from the speeds they report (kvgrid.server.autoscale.observed)
    planner = Planner(cfg, load_calibration(args.calibration)) if args.calibration else cfg
    return Autoscaler(act, planner, args.autoscale_interval, enabled=args.autoscale)


def run_router(args: argparse.Namespace) -> int:

    from kvgrid.server.frontend import create_frontend_app

    try:
        key = load_control_key(args.control_key_file)
    except CredentialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    host = _default_host(args)
    if key is None and not is_loopback_host(host):
        print(
            f"error: binding {host} needs a control key (--control-key-file, or "
            f"{envs.KVGRID_CONTROL_KEY.name} / {envs.KVGRID_CONTROL_KEY_FILE.name}; "
            "`kvgrid control-key new` makes one): without it the "
            "router cannot tell its workers from anyone else",
            file=sys.stderr,
        )
        return 2
    fe = _frontend_from_args(args, args.worker, key)
    if fe is None:
        return 2
    _run_http(create_frontend_app(fe), fe.bind_host, args.port)
    return 0


def frontend_from_args(args: argparse.Namespace, workers: list[str], key):
    """The router's frontend from the command's flags, with its bind address checked
    (``fe.bind_host``); ValueError or OSError if the model, the keys file or the address
    cannot be used."""
    from kvgrid.flags import dataclass_from_args, dataclass_kwargs
    from kvgrid.router.disagg import DISAGG_FLAG_FIELDS, DisaggConfig
    from kvgrid.server.config import FrontendConfig
    from kvgrid.server.frontend import build_frontend

    host = frontend_host(args)  # before loading anything: fail fast
    fe = build_frontend(
        args.model,
        args.load_format,
        args.served_model_name,
        workers,
        args.policy,
        args.api_keys,
        args.max_concurrent,
        heartbeat_timeout_s=args.heartbeat_timeout,
        disagg=dataclass_from_args(
            DisaggConfig,
            args,
            DISAGG_FLAG_FIELDS,
            itl_target_s=args.itl_target,
            ttft_target_s=args.ttft_target,
        ),
        control_key=key,
        public=not is_loopback_host(host),
        tool_call_parser=args.tool_call_parser,
        **dataclass_kwargs(FrontendConfig, args),
    )
    fe.bind_host = _bind_host(args, fe.tenants.auth_required)
    return fe


def _frontend_from_args(args: argparse.Namespace, workers: list[str], key):
    """``frontend_from_args``, or None (message printed)."""
    try:
        return frontend_from_args(args, workers, key)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
