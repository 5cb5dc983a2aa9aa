"""Router: the worker registry, the KV index and a policy, driven by method calls.

Pure: no sockets, no threads, no clocks. Every method that depends on time takes ``now``
(seconds, any monotonic origin), so the live server and the fleet simulator run this same
code. The server feeds it load reports, event batches and snapshots as they arrive, asks
it for a ``Decision`` per request, and reports first tokens and completions back.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvgrid import keys as kvkeys
from kvgrid.events import EventBatch
from kvgrid.router.disagg import DisaggConfig, PrefillPlan, Side, plan_prefill
from kvgrid.router.index import KVIndex, Overlap, WorkerEntry
from kvgrid.router.policies import (
    DEFAULT_POLICY,
    Candidate,
    Policy,
    make_policy,
    predict_ttft,
)
from kvgrid.router.recent import RecentDecisions
from kvgrid.router.workers import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_PREFILL_TOKENS_PER_S,
    DEFAULT_TIER_BYTES_PER_S,
    InFlight,
    WorkerInfo,
    WorkerLoad,
    WorkerState,
)

log = logging.getLogger(__name__)

FRESHNESS = ("exact", "predicted", "stale", "down")
PREFILL_SUFFIX = "#prefill"  # a remote prefill's in-flight entry on its prefill worker


class NoWorkerError(RuntimeError):
    """No live worker can take the request (none registered, all down, or none serves it)."""


@dataclass
class RouteRequest:
    request_id: str
    token_ids: Sequence[int] = ()
    tenant: bytes = kvkeys.PUBLIC_TENANT  # tenant scope, derived by the server
    model: str | None = None  # None: any worker
    # Precomputed block keys (one-scope fleets, the simulator); then token_ids may be empty
    # and num_tokens gives the prompt length.
    keys: list[bytes] | None = None
    num_tokens: int | None = None
    # leading tokens of a prefix configured as shared across tenants (keys.block_keys_shared)
    shared_prefix_tokens: int = 0
    # every prompt position is computed where the request decodes (prompt logprobs need
    # their logits): no cached block serves it, and no other worker prefills it
    whole_prompt: bool = False

    @property
    def prompt_tokens(self) -> int:
        return self.num_tokens if self.num_tokens is not None else len(self.token_ids)


@dataclass
class Decision:
    request_id: str
    worker_id: str
    policy: str
    prompt_tokens: int
    predicted_cached_tokens: int
    predicted_ttft_s: float
    candidates: list[Candidate] = field(default_factory=list)
    decided_at: float = 0.0
    elapsed_s: float = 0.0  # time spent deciding (wall clock)
    tenant: bytes = kvkeys.PUBLIC_TENANT  # whose request (never shown; /debug filters by it)
    prefill: PrefillPlan | None = None  # where the prompt is computed (with disaggregation)

    @property
    def remote_prefill(self) -> bool:
        return self.prefill is not None and self.prefill.remote

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "worker_id": self.worker_id,
            "policy": self.policy,
            "prompt_tokens": self.prompt_tokens,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "predicted_ttft_s": round(self.predicted_ttft_s, 6),
            "decision_us": round(self.elapsed_s * 1e6, 1),
            "candidates": [c.to_dict() for c in self.candidates],
            "prefill": self.prefill.to_dict() if self.prefill is not None else None,
        }

    def log_line(self) -> str:
        parts = [
            f"{c.worker_id}:match={c.overlap.blocks}b,backlog={c.backlog_tokens},"
            f"ttft={c.predicted_ttft_s * 1e3:.1f}ms,{c.freshness}"
            for c in self.candidates
        ]
        line = (
            f"route {self.request_id} -> {self.worker_id} [{self.policy}] "
            f"cached~{self.predicted_cached_tokens}/{self.prompt_tokens} | " + " ".join(parts)
        )
        p = self.prefill
        if p is not None:
            where = f"remote@{p.worker_id}" if p.remote else "local"
            remote = f"{p.remote_ttft_s * 1e3:.1f}ms" if p.remote_ttft_s is not None else "-"
            line += (
                f" | prefill {where} ({p.reason}: ttft local {p.local_ttft_s * 1e3:.1f}ms "
                f"remote {remote}, itl local {p.local_itl_s * 1e3:.1f}ms "
                f"remote {p.remote_itl_s * 1e3:.1f}ms)"
            )
        return line


class Router:
    def __init__(
        self,
        policy: str | Policy = DEFAULT_POLICY,
        recent_ttl_s: float = 5.0,
        heartbeat_timeout_s: float = 5.0,
        disagg: DisaggConfig | None = None,
        site_rtt_s: dict[str, float] | None = None,
        **policy_kwargs: Any,
    ) -> None:
        """``site_rtt_s``: the round trip to each site's workers (kvgrid.router.sites), which
        every request sent there pays before its first token."""
        self.policy = policy if isinstance(policy, Policy) else make_policy(policy, **policy_kwargs)
        # None: no per-request prefill decision (a fleet without transfers, the simulator)
        self.disagg = disagg
        self.index = KVIndex()
        self.recent = RecentDecisions(recent_ttl_s)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.site_rtt_s = dict(site_rtt_s or {})
        self.workers: dict[str, WorkerState] = {}
        self._requests: dict[str, tuple[str, Sequence[int], list[bytes], bytes, int]] = {}
        self._speeds: tuple[float, float] = (DEFAULT_PREFILL_TOKENS_PER_S, DEFAULT_DECODE_STEP_S)
        self._speeds_dirty = True
        self._speeds_at = float("-inf")
        self._scope_digests: dict[tuple[kvkeys.KVScope, bytes], bytes] = {}
        self._groups: dict[str, tuple[WorkerInfo, bytes, tuple[bytes, int]]] = {}
        self.decisions: deque[Decision] = deque(maxlen=256)  # for /debug
        self.counters = {"decisions": 0, "resyncs_requested": 0, "gaps": 0, "workers_lost": 0}
        self.prefill_reasons: dict[str, int] = {}  # disaggregation decisions by reason

    # ---- registry ------------------------------------------------------------------------

    def add_worker(self, info: WorkerInfo, now: float) -> bool:
        """Register a worker, or re-register one that came back. Returns True if the caller
        must fetch the worker's snapshot (its index entry is stale)."""
        old = self.workers.get(info.worker_id)
        if old is not None and old.info.epoch == info.epoch and old.up:
            old.info = info
            old.last_seen = now
            return self.index.is_stale(info.worker_id)
        if old is not None:  # a new life of the worker, or back from down: forget the old one
            self._drop_worker_state(info.worker_id)
        self.workers[info.worker_id] = WorkerState(info, last_seen=now)
        self.index.add_worker(info.worker_id)
        self._speeds_dirty = True
        if not info.events:
            self.index.apply_snapshot(info.worker_id, 0, {})  # nothing will come: not stale
            return False
        return True

    def remove_worker(self, worker_id: str) -> None:
        if worker_id in self.workers:
            self._drop_worker_state(worker_id)
            del self.workers[worker_id]
            self._groups.pop(worker_id, None)
            self.index.remove_worker(worker_id)

    def mark_down(self, worker_id: str, now: float, reason: str = "") -> None:
        """The worker is unreachable: route nothing there and drop its blocks."""
        w = self.workers.get(worker_id)
        if w is None or not w.up:
            return
        log.warning("worker %s marked down%s", worker_id, f": {reason}" if reason else "")
        self._drop_worker_state(worker_id)
        self.index.reset_worker(worker_id)
        w.up, w.down_since = False, now
        self.counters["workers_lost"] += 1
        self._speeds_dirty = True

    def set_draining(self, worker_id: str, draining: bool = True) -> None:
        self.workers[worker_id].draining = draining

    def _drop_worker_state(self, worker_id: str) -> None:
        if self.index.has_worker(worker_id):
            self.recent.forget_worker(self.index.bit(worker_id))
        w = self.workers.get(worker_id)
        if w is not None:
            for rid in list(w.inflight):
                self._requests.pop(rid, None)
            w.clear_inflight()

    def check_liveness(self, now: float) -> list[str]:
        """Mark down workers silent for longer than the heartbeat timeout; returns them."""
        lost = [
            wid
            for wid, w in self.workers.items()
            if w.up and now - w.last_seen > self.heartbeat_timeout_s
        ]
        for wid in lost:
            self.mark_down(wid, now, "no heartbeat")
        return lost

    def freshness(self, worker_id: str) -> str:
        w = self.workers[worker_id]
        if not w.up:
            return "down"
        if not w.info.events:
            return "predicted"
        return "stale" if self.index.is_stale(worker_id) else "exact"

    # ---- feeds from workers --------------------------------------------------------------

    def on_load(self, report: WorkerLoad | dict, now: float) -> bool:
        """A load report (heartbeat). Returns True if a snapshot must be fetched."""
        if isinstance(report, dict):
            report = WorkerLoad.from_dict(report)
        w = self.workers.get(report.worker_id)
        if w is None or not w.up or (report.epoch and report.epoch != w.info.epoch):
            return False
        speeds_changed = (report.prefill_tokens_per_s, report.decode_step_s) != (
            w.load.prefill_tokens_per_s,
            w.load.decode_step_s,
        )
        w.set_load(report)
        w.last_seen = now
        if speeds_changed:
            self._speeds_dirty = True
        if not w.info.events:
            return False
        if self.index.note_seq(report.worker_id, report.kv_seq):
            self.counters["gaps"] += 1
        if self.index.is_stale(report.worker_id):
            self.counters["resyncs_requested"] += 1
            return True
        return False

    def on_events(self, batch: EventBatch, now: float, epoch: str = "") -> str:
        """Apply a KV event batch; "gap" means the caller must fetch a snapshot."""
        w = self.workers.get(batch.worker_id)
        if w is None or not w.up or (epoch and epoch != w.info.epoch):
            return "unknown"
        w.last_seen = now
        status = self.index.apply_batch(batch)
        if status == "gap":
            self.counters["gaps"] += 1
            self.counters["resyncs_requested"] += 1
        return status

    def on_snapshot(
        self,
        worker_id: str,
        seq: int,
        tiers: dict[str, Iterable[bytes]],
        now: float,
        epoch: str = "",
    ) -> str:
        w = self.workers.get(worker_id)
        if w is None or not w.up or (epoch and epoch != w.info.epoch):
            return "unknown"
        w.last_seen = now
        return self.index.apply_snapshot(worker_id, seq, tiers)

    # ---- routing -------------------------------------------------------------------------

    def _scope_digest(self, scope: kvkeys.KVScope, tenant: bytes) -> bytes:
        k = (scope, tenant)
        d = self._scope_digests.get(k)
        if d is None:
            d = self._scope_digests[k] = scope.with_tenant(tenant).digest
        return d

    def _group_of(self, info: WorkerInfo, tenant: bytes) -> tuple[bytes, int]:
        """(scope digest for ``tenant``, block size): workers alike here share a key chain.

        Remembered per worker for the last tenant it was asked with: the lookup by scope
        hashes the scope's fields, and routing asks for every candidate of every decision.
        """
        memo = self._groups.get(info.worker_id)
        if memo is None or memo[0] is not info or memo[1] != tenant:
            g = (self._scope_digest(info.scope, tenant), info.block_size)
            memo = self._groups[info.worker_id] = (info, tenant, g)
        return memo[2]

    # Fleet medians only stand in for workers that have not measured themselves yet, and
    # speeds move slowly: recompute them at most once per load-report interval, not per
    # decision (each recompute walks the whole fleet).
    SPEEDS_REFRESH_S = 0.5

    def _fleet_speeds(self, now: float) -> tuple[float, float]:
        if self._speeds_dirty and now - self._speeds_at >= self.SPEEDS_REFRESH_S:
            pf = [
                w.load.prefill_tokens_per_s
                for w in self.workers.values()
                if w.up and w.load.prefill_tokens_per_s
            ]
            ds = [
                w.load.decode_step_s for w in self.workers.values() if w.up and w.load.decode_step_s
            ]
            self._speeds = (
                statistics.median(pf) if pf else DEFAULT_PREFILL_TOKENS_PER_S,
                statistics.median(ds) if ds else DEFAULT_DECODE_STEP_S,
            )
            self._speeds_dirty = False
            self._speeds_at = now
        return self._speeds

    def route(
        self,
        req: RouteRequest,
        now: float,
        exclude: Iterable[str] = (),
        dry_run: bool = False,
        candidates: Iterable[str] | None = None,
    ) -> Decision:
        """Choose a worker and record the choice (recent prefixes, in-flight load); with
        ``dry_run`` only explain what would be chosen. ``candidates`` limits the choice to
        those workers (a preselection that keeps decisions cheap in very large fleets)."""
        t0 = time.perf_counter()
        self.recent.expire(now)
        excluded = set(exclude) if exclude else ()
        index = self.index
        entry = index.entry
        tenant, model = req.tenant, req.model
        # Workers sharing a scope and block size share one key chain: compute it once.
        groups: dict[tuple[bytes, int], list[tuple[WorkerState, WorkerEntry]]] = {}
        stale_mask = 0
        within: int | None = None
        if candidates is None:
            pool: Iterable[WorkerState] = self.workers.values()
        else:
            workers = self.workers
            pool = [workers[c] for c in candidates if c in workers]
            within = 0
        for w in pool:
            info = w.info
            wid = info.worker_id
            e = entry(wid)
            if within is not None:
                within |= 1 << e.bit  # every candidate, as the preselection named them
            if not w.up or w.draining or wid in excluded:
                continue
            if model is not None and info.model != model:
                continue
            groups.setdefault(self._group_of(info, tenant), []).append((w, e))
            if e.stale:
                stale_mask |= 1 << e.bit
        if not groups:
            raise NoWorkerError(
                "no live worker" + (f" serves model {req.model!r}" if req.model else "")
            )
        n_prompt = req.prompt_tokens
        cands: list[Candidate] = []
        group_keys: dict[str, list[bytes]] = {}
        empty = Overlap()
        site_rtt = self.site_rtt_s
        # fleet medians, fetched only for a worker without its own (a fetch may refresh them)
        speeds: tuple[float, float] | None = None
        for (digest, bs), members in groups.items():
            if req.keys is not None:
                rkeys = req.keys
            elif req.shared_prefix_tokens >= bs:
                info0 = members[0][0].info
                public = self._scope_digest(info0.scope, kvkeys.PUBLIC_TENANT)
                rkeys = kvkeys.block_keys_shared(
                    req.token_ids, digest, bs, req.shared_prefix_tokens, public
                )
            else:
                rkeys = kvkeys.block_keys(req.token_ids, digest, bs)
            overlaps = index.overlap(rkeys, self.recent.masks, stale_mask, within)
            # the last prompt token is always computed
            hit_cap = 0 if req.whole_prompt else max(0, (n_prompt - 1) // bs)
            for w, e in members:
                ld, info = w.load, w.info
                wid = info.worker_id
                group_keys[wid] = rkeys
                o = overlaps.get(wid, empty)
                blocks = o.blocks
                cached = (blocks if blocks < hit_cap else hit_cap) * bs
                pf = ld.prefill_tokens_per_s
                if not pf:
                    speeds = speeds or self._fleet_speeds(now)
                    pf = speeds[0]
                ds = ld.decode_step_s
                if not ds:
                    speeds = speeds or self._fleet_speeds(now)
                    ds = speeds[1]
                tier_load = 0.0
                if blocks > o.by_tier[0] + o.predicted and info.bytes_per_block:
                    # lower-tier blocks: loading them competes with recomputing them
                    for ti, tier in enumerate(("G2", "G3", "G4"), start=1):
                        n = o.by_tier[ti]
                        if n:
                            bw = ld.tier_bytes_per_s.get(tier) or DEFAULT_TIER_BYTES_PER_S[tier]
                            tier_load += min(n * info.bytes_per_block / bw, n * bs / pf)
                if not info.events:
                    fresh = "predicted"
                else:
                    fresh = "stale" if e.stale else "exact"
                backlog, decoding, active = w.loads()
                c = Candidate(
                    wid,
                    fresh,
                    o,
                    n_prompt,
                    cached,
                    n_prompt - cached,
                    backlog,
                    decoding,
                    active,
                    ld.kv_usage,
                    e.num_blocks(),
                    ld.kv_usage * ld.num_kv_blocks,
                    bs,
                    pf,
                    ds,
                    info.max_num_batched_tokens,
                    tier_load,
                    site_rtt.get(info.site, 0.0) if site_rtt else 0.0,
                )
                predict_ttft(c)
                cands.append(c)
        workers = self.workers
        decoders = [c for c in cands if workers[c.worker_id].role != "prefill"]
        if not decoders:
            raise NoWorkerError("no live worker decodes (every one is prefill-only)")
        pick = self.policy.choose(decoders)
        wid = pick.worker_id
        rkeys = group_keys[wid]
        w = workers[wid]
        plan = None
        if self.disagg is not None:
            plan = self._plan_prefill(w, pick, cands, n_prompt, tenant, req.whole_prompt)
        if not dry_run:
            self.recent.record(self.index.bit(wid), rkeys, now)
            if plan is not None and plan.remote:
                self._start_remote(req.request_id, w, plan, rkeys, n_prompt, now)
            else:
                w.add_inflight(req.request_id, InFlight(wid, now, n_prompt, pick.uncached_tokens))
            if req.token_ids or req.keys is not None:  # finish/first-token find it in O(1)
                digest = self._scope_digest(w.info.scope, req.tenant)
                self._requests[req.request_id] = (
                    wid,
                    req.token_ids,
                    rkeys,
                    digest,
                    w.info.block_size,
                )
        cached = pick.cached_tokens
        if plan is not None and plan.remote:  # the moved blocks land there: served from cache
            cached = (plan.start_block + plan.num_blocks) * w.info.block_size
        d = Decision(
            request_id=req.request_id,
            worker_id=wid,
            policy=self.policy.name,
            prompt_tokens=n_prompt,
            predicted_cached_tokens=cached,
            predicted_ttft_s=pick.predicted_ttft_s,
            candidates=cands,
            decided_at=now,
            elapsed_s=time.perf_counter() - t0,
            tenant=req.tenant,
            prefill=plan,
        )
        if not dry_run:
            self.decisions.append(d)
            self.counters["decisions"] += 1
            if plan is not None:
                key = ("remote:" if plan.remote else "local:") + plan.reason
                self.prefill_reasons[key] = self.prefill_reasons.get(key, 0) + 1
        return d

    # ---- disaggregation --------------------------------------------------------------------

    def _side(self, w: WorkerState, c: Candidate) -> Side:
        ld = w.load
        return Side(
            c,
            ld.mixed_prefill_tokens,
            ld.transfer_bytes_per_s,
            ld.transfer_setup_s,
            ld.tier_bytes_per_s.get("G2"),
            w.info.bytes_per_block,
            w.info.device,
        )

    def _plan_prefill(
        self,
        w: WorkerState,
        pick: Candidate,
        cands: list[Candidate],
        n_prompt: int,
        tenant: bytes,
        whole_prompt: bool = False,
    ) -> PrefillPlan:
        """Prefill where ``pick`` decodes, or on a worker that streams the KV to it: only a
        worker of the same key chain (model, dtype, block size), itself able to transfer."""
        group = self._group_of(w.info, tenant)
        others = []
        for c in cands:
            o = self.workers[c.worker_id]
            if (
                c is not pick
                and o.role != "decode"
                and o.info.transfer_endpoint
                and self._group_of(o.info, tenant) == group
            ):
                others.append(self._side(o, c))
        can_receive = bool(w.info.transfer_endpoint)
        return plan_prefill(
            self.disagg, self._side(w, pick), others, n_prompt, can_receive, whole_prompt
        )

    def _start_remote(
        self, rid: str, w: WorkerState, plan: PrefillPlan, rkeys: list[bytes], n: int, now: float
    ) -> None:
        """Book a remote prefill: the decode worker computes only the prompt's last tokens,
        the prefill worker the rest (until ``on_prefill_done``); both will hold its blocks."""
        bs = w.info.block_size
        upto = plan.start_block + plan.num_blocks
        w.add_inflight(rid, InFlight(w.worker_id, now, n, n - upto * bs))
        pw = self.workers[plan.worker_id]
        opt = next(o for o in plan.options if o.worker_id == plan.worker_id)
        pw.add_inflight(rid + PREFILL_SUFFIX, InFlight(pw.worker_id, now, n, opt.uncached_tokens))
        self.recent.record(self.index.bit(pw.worker_id), rkeys[:upto], now)

    def on_prefill_done(self, request_id: str, now: float) -> None:
        """A remote prefill ended (its transfer finished, or failed): its worker is free of it."""
        found = self._inflight(request_id + PREFILL_SUFFIX)
        if found:
            found[0].remove_inflight(request_id + PREFILL_SUFFIX, finished=True)

    # ---- request lifecycle ---------------------------------------------------------------

    def _inflight(self, request_id: str) -> tuple[WorkerState, InFlight] | None:
        entry = self._requests.get(request_id)
        wid = entry[0] if entry else None
        for w in [self.workers[wid]] if wid in self.workers else self.workers.values():
            r = w.inflight.get(request_id)
            if r is not None:
                return w, r
        return None

    def on_first_token(self, request_id: str, now: float) -> None:
        found = self._inflight(request_id)
        if found:
            found[0].first_token(request_id)

    def on_finish(
        self, request_id: str, now: float, output_token_ids: Sequence[int] | None = None
    ) -> None:
        """The request ended. With its output tokens, the blocks the worker computed for the
        output are predicted too (multi-turn chats resend them in the next turn)."""
        found = self._inflight(request_id)
        if found:
            found[0].remove_inflight(request_id, finished=True)
        entry = self._requests.pop(request_id, None)
        if not (entry and output_token_ids and found and found[0].up):
            return
        wid, prompt, rkeys, digest, bs = entry
        # the last sampled token never went through the model, so its KV does not exist
        tokens = list(prompt) + list(output_token_ids[:-1])
        n_full = len(tokens) // bs
        if n_full > len(rkeys):
            more = kvkeys.block_keys(
                tokens[: n_full * bs],
                digest,
                bs,
                parent=rkeys[-1] if rkeys else None,
                start_block=len(rkeys),
            )
            self.recent.record(self.index.bit(wid), more, now)

    # ---- introspection -------------------------------------------------------------------

    def snapshot_state(self) -> dict[str, Any]:
        return {
            "policy": self.policy.name,
            "workers": {
                wid: {
                    "url": w.info.url,
                    "role": w.role,
                    "transfer_endpoint": w.info.transfer_endpoint,
                    "site": w.info.site,
                    "device": w.info.device,
                    "up": w.up,
                    "draining": w.draining,
                    "freshness": self.freshness(wid),
                    "kv_seq": self.index.seq(wid) if self.index.has_worker(wid) else None,
                    "cached_blocks": (
                        self.index.num_blocks(wid) if self.index.has_worker(wid) else 0
                    ),
                    "inflight": len(w.inflight),
                    "load": w.load.to_dict(),
                }
                for wid, w in self.workers.items()
            },
            "recent_entries": len(self.recent),
            "counters": dict(self.counters),
            "disagg": self.disagg.mode if self.disagg is not None else None,
            "prefill_decisions": dict(self.prefill_reasons),
        }
