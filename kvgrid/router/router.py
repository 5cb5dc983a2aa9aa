"""Router: the worker registry, the KV index and a policy, driven by method calls.

Pure: no sockets, no threads, no clocks. Every method that depends on time takes ``now``
(seconds, any monotonic origin), so the live server and the fleet simulator run this same
code. The server feeds it load reports, event batches and snapshots as they arrive, asks
it for a ``Decision`` per request, and reports first tokens and completions back.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvgrid import keys as kvkeys
from kvgrid.events import EventBatch
from kvgrid.router.candidates import Candidate, score_group
from kvgrid.router.decision import Decision
from kvgrid.router.disagg import DisaggConfig, PrefillPlan, Side, plan_prefill
from kvgrid.router.index import KVIndex, WorkerEntry
from kvgrid.router.keychains import KeyChains
from kvgrid.router.policies import DEFAULT_POLICY, Policy, make_policy
from kvgrid.router.recent import RecentDecisions
from kvgrid.router.workers import FleetSpeeds, InFlight, WorkerInfo, WorkerLoad, WorkerState

log = logging.getLogger(__name__)

FRESHNESS = ("exact", "predicted", "stale", "down")
PREFILL_SUFFIX = "#prefill"  # a remote prefill's in-flight entry on its prefill worker


# eligible workers by key chain (scope digest, block size), with their index entries
_Groups = dict[tuple[bytes, int], list[tuple[WorkerState, WorkerEntry]]]


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
        self.speeds = FleetSpeeds()
        self.chains = KeyChains()
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
        self.speeds.dirty = True
        if not info.events:
            self.index.apply_snapshot(info.worker_id, 0, {})  # nothing will come: not stale
            return False
        return True

    def remove_worker(self, worker_id: str) -> None:
        if worker_id in self.workers:
            self._drop_worker_state(worker_id)
            del self.workers[worker_id]
            self.chains.forget(worker_id)
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
        self.speeds.dirty = True

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
            self.speeds.dirty = True
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
        groups, stale_mask, within = self._eligible(req, exclude, candidates)
        cands, chain_keys = self._candidates(req, groups, stale_mask, within, now)
        pick = self._choose(cands)
        w = self.workers[pick.worker_id]
        plan = None
        if self.disagg is not None:
            plan = self._plan_prefill(
                w, pick, cands, req.prompt_tokens, req.tenant, req.whole_prompt
            )
        if not dry_run:
            rkeys = chain_keys[self.chains.group_of(w.info, req.tenant)]
            self._book(req, w, pick, plan, rkeys, now)
        cached = pick.prompt.cached_tokens
        if plan is not None and plan.remote:  # the moved blocks land there: served from cache
            cached = (plan.start_block + plan.num_blocks) * w.info.block_size
        d = Decision(
            request_id=req.request_id,
            worker_id=pick.worker_id,
            policy=self.policy.name,
            prompt_tokens=req.prompt_tokens,
            predicted_cached_tokens=cached,
            predicted_ttft_s=pick.predicted_ttft_s,
            candidates=cands,
            decided_at=now,
            elapsed_s=time.perf_counter() - t0,
            tenant=req.tenant,
            prefill=plan,
        )
        if not dry_run:
            self._count(d)
        return d

    def _eligible(
        self, req: RouteRequest, exclude: Iterable[str], candidates: Iterable[str] | None
    ) -> tuple[_Groups, int, int | None]:
        """The workers that may take ``req``, grouped by key chain (workers sharing a scope
        and block size share one: it is computed once per group); the index bits of the stale
        ones; and the bits of the preselected ``candidates`` (None: no preselection)."""
        excluded = set(exclude) if exclude else ()
        entry = self.index.entry
        tenant, model = req.tenant, req.model
        groups: _Groups = {}
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
            groups.setdefault(self.chains.group_of(info, tenant), []).append((w, e))
            if e.stale:
                stale_mask |= 1 << e.bit
        if not groups:
            raise NoWorkerError(
                "no live worker" + (f" serves model {req.model!r}" if req.model else "")
            )
        return groups, stale_mask, within

    def _candidates(
        self, req: RouteRequest, groups: _Groups, stale_mask: int, within: int | None, now: float
    ) -> tuple[list[Candidate], dict[tuple[bytes, int], list[bytes]]]:
        """Every eligible worker as a Candidate with its predicted TTFT, and the request's
        block keys in each key chain."""
        cands: list[Candidate] = []
        chain_keys: dict[tuple[bytes, int], list[bytes]] = {}
        speeds = functools.partial(self.speeds.get, self.workers.values(), now)
        for (digest, bs), members in groups.items():
            rkeys = chain_keys[digest, bs] = self.chains.request_keys(
                req, digest, bs, members[0][0].info.scope
            )
            overlaps = self.index.overlap(rkeys, self.recent.masks, stale_mask, within)
            cands += score_group(
                members, overlaps, req.prompt_tokens, bs, req.whole_prompt, speeds, self.site_rtt_s
            )
        return cands, chain_keys

    def _choose(self, cands: list[Candidate]) -> Candidate:
        """The policy's pick among the candidates that decode."""
        workers = self.workers
        decoders = [c for c in cands if workers[c.worker_id].role != "prefill"]
        if not decoders:
            raise NoWorkerError("no live worker decodes (every one is prefill-only)")
        return self.policy.choose(decoders)

    def _book(
        self,
        req: RouteRequest,
        w: WorkerState,
        pick: Candidate,
        plan: PrefillPlan | None,
        rkeys: list[bytes],
        now: float,
    ) -> None:
        """Record the choice: the prefix as recently sent to ``w``, the request in flight
        there (and on its prefill worker), and what on_finish needs to find it in O(1)."""
        wid, n_prompt = w.worker_id, req.prompt_tokens
        self.recent.record(self.index.bit(wid), rkeys, now)
        if plan is not None and plan.remote:
            self._start_remote(req.request_id, w, plan, rkeys, n_prompt, now)
        else:
            inflight = InFlight(wid, now, n_prompt, pick.prompt.uncached_tokens)
            w.add_inflight(req.request_id, inflight)
        if req.token_ids or req.keys is not None:
            digest = self.chains.digest(w.info.scope, req.tenant)
            entry = (wid, req.token_ids, rkeys, digest, w.info.block_size)
            self._requests[req.request_id] = entry

    def _count(self, d: Decision) -> None:
        self.decisions.append(d)
        self.counters["decisions"] += 1
        if d.prefill is not None:
            key = ("remote:" if d.prefill.remote else "local:") + d.prefill.reason
            self.prefill_reasons[key] = self.prefill_reasons.get(key, 0) + 1

    # ---- disaggregation --------------------------------------------------------------------

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
        group = self.chains.group_of(w.info, tenant)
        others = []
        for c in cands:
            o = self.workers[c.worker_id]
            if (
                c is not pick
                and o.role != "decode"
                and o.info.transfer_endpoint
                and self.chains.group_of(o.info, tenant) == group
            ):
                others.append(Side.of(o, c))
        can_receive = bool(w.info.transfer_endpoint)
        return plan_prefill(
            self.disagg, Side.of(w, pick), others, n_prompt, can_receive, whole_prompt
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
