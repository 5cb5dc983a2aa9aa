"""The campaign: a fault-free reference run, then one segment of requests per fault kind
(for each G4 backend), every answer judged against the reference, and after each segment
a check that admission slots, leases, pinned blocks and G1 blocks are all idle again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from kvgrid.chaos.client import Flights, ask
from kvgrid.chaos.faults import Ctx, Fault, all_faults
from kvgrid.chaos.system import System, SystemConfig
from kvgrid.chaos.workload import CLEAN, HUNG, IDENTICAL, WRONG, Workload, judge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CampaignConfig:
    requests: int = 2000
    seed: int = 0
    faults: tuple[str, ...] = tuple(all_faults())
    g4: tuple[str, ...] = ("redis", "fs")
    system: SystemConfig = field(default_factory=SystemConfig)
    concurrency: int = 8
    conversations: int = 48
    turns: int = 4
    max_tokens: int = 16
    system_rules: int = 12  # length of the shared system prompts
    deadline_s: float = 300.0  # a request unanswered this long is hung
    idle_timeout_s: float = 90.0
    # between segments, wait for every worker to be back (False: all but one, so that a
    # worker still restarting after a kill does not hold the next segment)
    wait_all_workers: bool = True
    workdir: str = "chaos-work"
    reference: str | None = None  # cache of the reference answers (JSON)


@dataclass
class Segment:
    fault: str
    g4: str
    requests: int = 0
    identical: int = 0
    clean_errors: int = 0
    wrong: int = 0
    hung: int = 0
    seconds: float = 0.0
    events: list[dict] = field(default_factory=list)
    idle: dict = field(default_factory=dict)
    migrations: dict = field(default_factory=dict)
    wrong_details: list[dict] = field(default_factory=list)
    clean_details: dict[str, int] = field(default_factory=dict)

    def add(self, outcome: str, detail: str, info: dict) -> None:
        self.requests += 1
        if outcome == IDENTICAL:
            self.identical += 1
        elif outcome == CLEAN:
            self.clean_errors += 1
            key = detail.split(":")[0]
            self.clean_details[key] = self.clean_details.get(key, 0) + 1
        elif outcome == HUNG:
            self.hung += 1
            self.wrong_details.append({"outcome": HUNG, **info})
        else:
            self.wrong += 1
            self.wrong_details.append({"outcome": WRONG, "detail": detail, **info})


class Campaign:
    def __init__(self, cfg: CampaignConfig, progress=None) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.workload = Workload(
            cfg.seed,
            cfg.conversations,
            cfg.turns,
            max_tokens=cfg.max_tokens,
            system_rules=cfg.system_rules,
        )
        self.reference: dict[str, dict] | None = None
        self.segments: list[Segment] = []
        self.faults = all_faults()
        unknown = set(cfg.faults) - set(self.faults)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(self.faults)}")
        self._next_conv = itertools.cycle(range(cfg.conversations))
        self.progress = progress  # called with (done, total)
        self._done = 0
        self.notes: list[str] = []

    # ---- planning ---------------------------------------------------------------------

    def plan(self, system: System | None = None) -> list[tuple[str, Fault]]:
        out = []
        for g4 in self.cfg.g4:
            for name in self.cfg.faults:
                f = self.faults[name]
                if "redis" in f.needs and g4 != "redis":
                    continue
                out.append((g4, f))
        return out

    def _available(self, f: Fault, system: System) -> bool:
        return not ("netns" in f.needs and system.netns is None)

    # ---- running ----------------------------------------------------------------------

    async def run(self) -> dict:
        t0 = time.time()
        plan = self.plan()
        per = math.ceil(self.cfg.requests / max(1, len(plan)))
        self.total = per * len(plan)
        self.reference = self._load_reference()
        base = Path(self.cfg.workdir)
        for g4 in self.cfg.g4:
            syscfg = SystemConfig(**{**asdict(self.cfg.system), "g4": g4})
            system = System(syscfg, base / g4)
            try:
                await asyncio.to_thread(system.start)
                limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
                async with httpx.AsyncClient(timeout=None, limits=limits) as client:
                    if self.reference is None:
                        self.reference = await self._reference(system, client)
                        self._save_reference()
                    for seg_g4, fault in plan:
                        if seg_g4 != g4:
                            continue
                        if not self._available(fault, system):
                            self.notes.append(f"{fault.name} skipped on {g4}: no netns")
                            continue
                        self.segments.append(await self._segment(system, client, fault, g4, per))
            finally:
                await asyncio.to_thread(system.close)
        return self.report(time.time() - t0)

    async def _reference(self, system: System, client: httpx.AsyncClient) -> dict[str, dict]:
        """Every request of the workload once, fault-free; each must succeed."""
        wl, ref = self.workload, {}
        flights = Flights()
        convs = iter(range(wl.conversations))

        async def runner():
            for c in convs:
                for turn in wl.turns_of(c):
                    a = await ask(client, system.url, wl.body(turn, ref), flights,
                                  self.cfg.deadline_s)  # fmt: skip
                    if a.status != 200 or not a.done or a.error or a.transport:
                        raise RuntimeError(f"reference request {turn.key} failed: {a}")
                    ref[turn.key] = {"text": a.text, "finish_reason": a.finish_reason}

        await asyncio.gather(*(runner() for _ in range(self.cfg.concurrency)))
        return ref

    async def _segment(self, system, client, fault: Fault, g4: str, budget: int) -> Segment:
        seg = Segment(fault.name, g4)
        ctx = Ctx(system, Flights(), random.Random(self.rng.randrange(1 << 30)))
        left = [budget]
        t0 = time.monotonic()
        before = await self._migrations(system)
        injector = asyncio.create_task(fault.run(ctx))
        wl = self.workload

        async def runner():
            while left[0] > 0:
                c = next(self._next_conv)
                for turn in wl.turns_of(c):
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                    close = fault.close_after(ctx.rng, turn.stream)
                    a = await ask(client, system.url, wl.body(turn, self.reference),
                                  ctx.flights, self.cfg.deadline_s, close)  # fmt: skip
                    outcome, detail = judge(a, self.reference[turn.key], fault.name)
                    info = {"request": turn.key, "stream": turn.stream, "status": a.status,
                            "worker": a.worker, "seconds": round(a.seconds, 2),
                            "error": a.error, "transport": a.transport}  # fmt: skip
                    if outcome == WRONG:
                        info["text"], info["expected"] = a.text, self.reference[turn.key]["text"]
                    seg.add(outcome, detail, info)
                    self._tick()

        try:
            await asyncio.gather(*(runner() for _ in range(self.cfg.concurrency)))
        finally:
            ctx.stopping.set()
            try:
                await asyncio.wait_for(injector, 120)
            except Exception as e:  # an injector that failed is reported, not hidden
                seg.events.append({"what": "injector failed", "error": repr(e)})
            await fault.heal(ctx)
        seg.events += ctx.events
        seg.seconds = round(time.monotonic() - t0, 1)
        n = system.expected_workers - (0 if self.cfg.wait_all_workers else 1)
        await asyncio.to_thread(system.wait_ready, 600.0, n)
        seg.idle = await self._idle(system)
        after = await self._migrations(system)
        seg.migrations = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        log.warning("segment %s/%s: %s", g4, fault.name, _row(seg))
        return seg

    def _tick(self) -> None:
        self._done += 1
        if self.progress is not None:
            self.progress(self._done, self.total)

    async def _migrations(self, system: System) -> dict[str, float]:
        st = await asyncio.to_thread(system.state)
        return dict((st or {}).get("migrations", {}))

    async def _idle(self, system: System) -> dict:
        """Poll until nothing is held (slots, runs, in-flight routes, worker requests, G1
        blocks, pins, leases, background I/O); what was still held at the deadline."""
        end = time.monotonic() + self.cfg.idle_timeout_s
        held: dict = {"state": "unreadable"}
        while time.monotonic() < end:
            st = await asyncio.to_thread(system.state)
            if st is not None:
                held = busy(st)
                if not held:
                    return {"idle": True}
            await asyncio.sleep(1.0)
        return {"idle": False, "held": held}

    # ---- reference cache and report ---------------------------------------------------

    def _load_reference(self) -> dict | None:
        p = self.cfg.reference
        if not p or not Path(p).exists():
            return None
        data = json.loads(Path(p).read_text())
        if data.get("workload") != self.workload.fingerprint:
            return None
        return data["answers"]

    def _save_reference(self) -> None:
        if self.cfg.reference:
            Path(self.cfg.reference).write_text(
                json.dumps({"workload": self.workload.fingerprint, "answers": self.reference})
            )

    def report(self, seconds: float) -> dict:
        rows = [_row(s) for s in self.segments]
        total = {k: sum(r[k] for r in rows) for k in ("requests", "identical", "clean_errors",
                                                      "wrong", "hung")}  # fmt: skip
        hit = sum(s.migrations.get("completed", 0) + s.migrations.get("error", 0)
                  for s in self.segments)  # fmt: skip
        done = sum(s.migrations.get("completed", 0) for s in self.segments)
        return {
            "config": {**asdict(self.cfg), "workload": self.workload.fingerprint},
            "seconds": round(seconds, 1),
            "total": total,
            "rows": rows,
            "migration": {
                "requests_hit_by_worker_loss": hit,
                "completed_by_migration": done,
                "share": (done / hit) if hit else None,
            },
            "leaks": [
                f"{s.g4}/{s.fault}: {s.idle}" for s in self.segments if not s.idle.get("idle")
            ],
            "segments": [asdict(s) for s in self.segments],
            "notes": self.notes,
        }


def _row(s: Segment) -> dict:
    return {"fault": s.fault, "g4": s.g4, "requests": s.requests, "identical": s.identical,
            "clean_errors": s.clean_errors, "wrong": s.wrong, "hung": s.hung,
            "idle": bool(s.idle.get("idle")),
            "migrated": int(s.migrations.get("completed", 0))}  # fmt: skip


def busy(state: dict) -> dict:
    """What the frontend's /admin/state says is still held; {} when all is idle."""
    held = {}
    adm = state.get("admission", {})
    for k in ("running", "waiting", "runs", "remote_prefills"):
        if adm.get(k):
            held[f"admission.{k}"] = adm[k]
    for wid, n in state.get("router", {}).get("inflight", {}).items():
        if n:
            held[f"router.inflight.{wid}"] = n
    for wid, w in state.get("workers", {}).items():
        st = w.get("state")
        if not w.get("up"):
            continue
        if st is None:
            held[f"{wid}.state"] = "unreadable"
            continue
        for k in ("num_running", "num_waiting", "sinks", "g1_blocks_in_use"):
            if st.get(k):
                held[f"{wid}.{k}"] = st[k]
        for k, v in (st.get("store") or {}).items():
            if k != "tiers" and v:
                held[f"{wid}.store.{k}"] = v
    return held
