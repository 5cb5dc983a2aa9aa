"""The faults a campaign injects, one kind per segment of requests. Each starts with the
segment (``run``, until told to stop) and is undone after it (``heal``).

Worker deaths and stalls pick their victim among the requests in flight (a worker serving a
stream that has output, or one whose request has not produced any yet: mid-prefill or
mid-load), so that they hit requests, not idle workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field

import redis

from kvgrid.chaos import disk
from kvgrid.chaos.client import Flights
from kvgrid.chaos.system import System

log = logging.getLogger(__name__)


@dataclass
class Ctx:
    system: System
    flights: Flights
    rng: random.Random
    events: list[dict] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def record(self, what: str, **info) -> None:
        self.events.append({"t": time.time(), "what": what, **info})
        log.info("fault: %s %s", what, info)

    async def call(self, fn, *args):
        return await asyncio.to_thread(fn, *args)

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless the segment ends first; False if it did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return False
        return True


class Fault:
    name = "none"
    needs: tuple[str, ...] = ()  # "redis", "fs" (G4 on a shared path), "netns"

    def close_after(self, rng: random.Random, stream: bool) -> int | None:
        """Content chunks after which the client drops this request (None: never)."""
        return None

    async def run(self, ctx: Ctx) -> None:
        await ctx.stopping.wait()

    async def heal(self, ctx: Ctx) -> None:
        return None


# ---- workers ----------------------------------------------------------------------------


class _WorkerFault(Fault):
    """Signals the worker serving a chosen request; one victim at a time, and only while
    every worker is up, so that there is always somewhere to migrate to."""

    mid_stream = True
    gap_s = 2.0

    def _pick(self, ctx: Ctx):
        managed = {f"w{i}" for i in range(ctx.system.cfg.workers)}
        if self.mid_stream:
            return lambda f: f.stream and f.chunks >= 2 and f.worker in managed
        return lambda f: f.stream and f.chunks == 0 and f.worker in managed

    async def run(self, ctx: Ctx) -> None:
        while not ctx.stopping.is_set():
            pids = await ctx.call(ctx.system.worker_pids)  # looked up first: the strike is quick
            if len(pids) < ctx.system.expected_workers:
                if not await ctx.sleep(1.0):
                    return
                continue
            f = await ctx.flights.wait_for(self._pick(ctx), 5.0)
            if f is None or ctx.stopping.is_set() or f.worker not in pids:
                continue
            in_flight = sum(1 for x in ctx.flights.live.values() if x.worker == f.worker)
            await self.strike(ctx, f.worker, pids[f.worker], in_flight)
            if not await ctx.sleep(self.gap_s):
                return

    async def strike(self, ctx: Ctx, worker: str, pid: int, in_flight: int) -> None:
        raise NotImplementedError


class KillMidStream(_WorkerFault):
    name = "worker_kill_stream"

    async def strike(self, ctx, worker, pid, in_flight):
        os.kill(pid, signal.SIGKILL)
        ctx.record("SIGKILL", worker=worker, pid=pid, streams_with_output=in_flight)


class KillMidLoad(KillMidStream):
    """The worker dies while a request is in prefill or loading its context."""

    name = "worker_kill_load"
    mid_stream = False


def _hold_s(ctx: Ctx) -> float:
    """How long a worker stays stopped or cut off: long enough for the router to give up on
    it (a stall timeout, then a probe) and for requests to move."""
    return 2 * ctx.system.cfg.stall_timeout_s + 4.0


class StopMidStream(_WorkerFault):
    """SIGSTOP (the worker stops answering), SIGCONT a while later."""

    name = "worker_stop_stream"

    async def strike(self, ctx, worker, pid, in_flight):
        os.kill(pid, signal.SIGSTOP)
        ctx.record("SIGSTOP", worker=worker, pid=pid, in_flight=in_flight)
        await asyncio.sleep(_hold_s(ctx))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
        ctx.record("SIGCONT", worker=worker, pid=pid)


class StopThenDie(_WorkerFault):
    """SIGSTOP, then SIGKILL while still stopped."""

    name = "worker_stop_die"

    async def strike(self, ctx, worker, pid, in_flight):
        os.kill(pid, signal.SIGSTOP)
        ctx.record("SIGSTOP", worker=worker, pid=pid, in_flight=in_flight)
        await asyncio.sleep(_hold_s(ctx) / 2)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        ctx.record("SIGKILL", worker=worker, pid=pid)


class RouterRestart(Fault):
    """SIGKILL of `kvgrid serve` (the router) with requests in flight, then a new one; its
    workers stop with it, the worker outside rejoins the new router."""

    name = "router_restart"

    async def run(self, ctx: Ctx) -> None:
        f = await ctx.flights.wait_for(lambda f: f.chunks >= 1, 30.0)
        if ctx.stopping.is_set():
            return
        ctx.record("router SIGKILL", in_flight=len(ctx.flights.live), had_output=f is not None)
        await ctx.call(ctx.system.kill_serve)
        await ctx.call(ctx.system.start_serve)
        t0 = time.monotonic()
        await ctx.call(ctx.system.wait_ready, 600.0)
        ctx.record("router back", seconds=round(time.monotonic() - t0, 1))


class Partition(Fault):
    """The worker in its own network namespace loses its link to the router for a while,
    with requests in flight on it when possible."""

    name = "partition"
    needs = ("netns",)

    async def run(self, ctx: Ctx) -> None:
        ns, wid = ctx.system.netns, ctx.system.outside_id
        while not ctx.stopping.is_set():
            await ctx.flights.wait_for(lambda f: f.worker == wid and f.chunks >= 1, 15.0)
            if ctx.stopping.is_set():
                return
            ns.cut()
            ctx.record("link cut", worker=wid)
            await asyncio.sleep(_hold_s(ctx))
            ns.heal()
            ctx.record("link healed", worker=wid)
            await ctx.call(ctx.system.wait_ready, 120.0)
            if not await ctx.sleep(3.0):
                return

    async def heal(self, ctx: Ctx) -> None:
        if ctx.system.netns is not None and not ctx.system.netns.up:
            ctx.system.netns.heal()


# ---- KV events and a slow disk (injection points inside the workers) --------------------


class EventFault(Fault):
    def __init__(self, kind: str, p: float = 0.3) -> None:
        self.kind, self.p = kind, p
        self.name = f"events_{kind}"

    async def run(self, ctx: Ctx) -> None:
        spec = {f"event_{self.kind}": self.p, "seed": ctx.rng.randrange(1 << 30)}
        while True:  # workers restarted meanwhile start clean: set it again now and then
            await ctx.call(ctx.system.set_faults, spec)
            if not await ctx.sleep(5.0):
                return

    async def heal(self, ctx: Ctx) -> None:
        await ctx.call(ctx.system.set_faults, {})


class SlowDisk(EventFault):
    name = "slow_disk"

    def __init__(self, delay_s: float = 0.25) -> None:
        self.delay_s = delay_s

    async def run(self, ctx: Ctx) -> None:
        while True:
            await ctx.call(ctx.system.set_faults, {"disk_read_delay_s": self.delay_s})
            if not await ctx.sleep(5.0):
                return


# ---- storage ----------------------------------------------------------------------------


def _dirs(system: System) -> list:
    return [system.g3] + ([system.g4_dir] if system.g4_dir is not None else [])


class DiskFull(Fault):
    name = "disk_full"

    async def run(self, ctx: Ctx) -> None:
        self.fillers = [await ctx.call(disk.fill, d) for d in _dirs(ctx.system)]
        ctx.record("filled", dirs=[str(d) for d in _dirs(ctx.system)])
        await ctx.stopping.wait()

    async def heal(self, ctx: Ctx) -> None:
        for f in getattr(self, "fillers", ()):
            f.unlink(missing_ok=True)


class DiskReadOnly(Fault):
    name = "disk_read_only"

    async def run(self, ctx: Ctx) -> None:
        self.done = []
        for d in _dirs(ctx.system):
            for _ in range(50):  # refused while a write is open on it: try again
                try:
                    disk.remount(d, "ro")
                    self.done.append(d)
                    break
                except disk.MountError:
                    await asyncio.sleep(0.1)
        ctx.record("read-only", dirs=[str(d) for d in self.done])
        await ctx.stopping.wait()

    async def heal(self, ctx: Ctx) -> None:
        for d in getattr(self, "done", ()):
            disk.remount(d, "rw")


class Damage(Fault):
    """Damages stored objects every ``every_s``: files of G3 and a G4 path, or values of
    G4 on Redis."""

    every_s = 1.0

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"objects_{kind}"

    async def run(self, ctx: Ctx) -> None:
        n = 0
        while not ctx.stopping.is_set():
            files = [f for d in _dirs(ctx.system) for f in disk.objects_under(d)]
            n += len(disk.damage(files, self.kind, ctx.rng))
            if ctx.system.redis_url:
                n += await ctx.call(_damage_redis, ctx.system.redis_url, self.kind, ctx.rng)
            if not await ctx.sleep(self.every_s):
                break
        ctx.record("damaged", kind=self.kind, objects=n)


def _damage_redis(url: str, kind: str, rng: random.Random) -> int:
    """Damage one or two object values in Redis the way ``disk.damage`` does files."""
    try:
        r = redis.Redis.from_url(url, socket_timeout=2.0)
        keys = [k for k in r.scan_iter(match="*obj:*", count=1000)][:2000]
        if len(keys) < 2:
            return 0
        if kind == "swapped":
            a, b = rng.sample(keys, 2)
            va, vb = r.get(a), r.get(b)
            if va is None or vb is None:
                return 0
            r.set(a, vb)
            r.set(b, va)
            return 2
        k = rng.choice(keys)
        v = r.get(k)
        if not v:
            return 0
        r.set(k, disk.damaged_bytes(v, kind, rng, other=r.get(rng.choice(keys)) or b""))
        return 1
    except redis.RedisError as e:
        log.warning("damaging Redis objects failed: %s", e)
        return 0


class RedisStop(Fault):
    """SIGSTOP of the Redis server for ``hold_s`` (a stuck shared tier), repeatedly."""

    name = "redis_stop"
    needs = ("redis",)
    hold_s = 6.0

    async def run(self, ctx: Ctx) -> None:
        proc = ctx.system.redis
        while not ctx.stopping.is_set():
            proc.send_signal(signal.SIGSTOP)
            ctx.record("redis SIGSTOP")
            await asyncio.sleep(self.hold_s)
            proc.send_signal(signal.SIGCONT)
            ctx.record("redis SIGCONT")
            if not await ctx.sleep(4.0):
                return

    async def heal(self, ctx: Ctx) -> None:
        with contextlib.suppress(ProcessLookupError):
            ctx.system.redis.send_signal(signal.SIGCONT)


class RedisRestart(Fault):
    """The Redis server killed, then started again (empty) after ``down_s``."""

    name = "redis_restart"
    needs = ("redis",)
    down_s = 4.0

    async def run(self, ctx: Ctx) -> None:
        while not ctx.stopping.is_set():
            ctx.system.redis.kill()
            await ctx.call(ctx.system.redis.wait)
            ctx.record("redis killed")
            await asyncio.sleep(self.down_s)
            await ctx.call(ctx.system.start_redis)
            ctx.record("redis started")
            if not await ctx.sleep(8.0):
                return

    async def heal(self, ctx: Ctx) -> None:
        if ctx.system.redis.poll() is not None:
            await ctx.call(ctx.system.start_redis)


class ClientDisconnect(Fault):
    """Half of the streams are closed by their client after a few chunks."""

    name = "client_disconnect"

    def close_after(self, rng: random.Random, stream: bool) -> int | None:
        return rng.randint(1, 4) if stream and rng.random() < 0.5 else None


def all_faults() -> dict[str, Fault]:
    faults: list[Fault] = [
        Fault(), KillMidStream(), KillMidLoad(), StopMidStream(), StopThenDie(),
        RouterRestart(), *(EventFault(k) for k in ("drop", "dup", "reorder", "garble")),
        Partition(), DiskFull(), DiskReadOnly(), *(Damage(k) for k in disk.DAMAGES),
        RedisStop(), RedisRestart(), SlowDisk(), ClientDisconnect(),
    ]  # fmt: skip
    return {f.name: f for f in faults}
