"""A simulated engine worker: a paged KV pool with an LRU prefix cache of real block keys,
and a continuous-batching timeline advanced in step batches, not per token.

The timeline alternates two modes. A *prefill phase* takes the queued requests that fit one
step budget (or one long prompt) and runs their uncached tokens in chunks of
``max_num_batched_tokens``; each chunk step also carries the running requests' next tokens
(chunked prefill mixes them into one forward pass, at their marginal cost), so decoders
advance by the number of chunks. Between phases the worker *decodes*: the running batch
advances one token per decode step, whose time depends on the batch size and the KV it reads.
Decode progress is one counter per worker (steps taken); a request finishes when the counter
reaches its target, so the only events are arrivals, phase ends and finishes: O(1) per
request however long its output.

KV: every full prompt block holds a key (kvgrid.keys). Blocks of running requests are
pinned (reference counted); when the last user ends, a block joins the LRU of cached free
blocks, evicted oldest first when a new request needs room. Output tokens and the partial
last prompt block occupy private blocks. Stored and evicted blocks become KV events for the
router, numbered per worker as a live worker numbers them. Optionally a G2 tier (host
memory) takes evicted blocks and serves hits at its bandwidth instead of recomputing.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque

from kvgrid.events import BlockRemoved, BlockStored, EventBatch
from kvgrid.planner.calibration import Calibration
from kvgrid.stats import ewma

IDLE, PREFILL, DECODE = 0, 1, 2
EPS = 1e-9


class SimRequest:
    __slots__ = (
        "cached",
        "decode_worker",
        "g2_hits",
        "idx",
        "input_len",
        "join_progress",
        "keys",
        "n_hit_g1",
        "out",
        "private",
        "rid",
        "t_arrival",
        "t_done",
        "t_first",
        "t_sent",
        "uncached",
        "worker",
    )

    def __init__(self, idx: int, rid: str, t: float, input_len: int, out: int, keys: list) -> None:
        self.idx = idx
        self.rid = rid
        self.t_arrival = t
        self.t_sent = t  # reaches the worker (after network latency)
        self.input_len = input_len
        self.out = out
        self.keys = keys
        self.cached = 0
        self.uncached = input_len
        self.n_hit_g1 = 0
        self.g2_hits = 0
        self.private = 0
        self.join_progress = 0.0
        self.t_first = -1.0
        self.t_done = -1.0
        self.worker = -1
        self.decode_worker = -1


class SimWorker:
    """One engine. ``role``: "mixed" (prefill and decode), "prefill" or "decode"."""

    def __init__(
        self,
        worker_id: str,
        index: int,
        calib: Calibration,
        block_tokens: int,
        role: str = "mixed",
        site: str = "default",
        g2_capacity_tokens: int = 0,
    ) -> None:
        self.worker_id = worker_id
        self.index = index
        self.c = calib
        self.bs = block_tokens
        self.role = role
        self.site = site
        self.cap = max(1, calib.kv_capacity_tokens // block_tokens)
        self.g2_cap = g2_capacity_tokens // block_tokens
        self.lru: OrderedDict[bytes, None] = OrderedDict()
        self.g2: OrderedDict[bytes, None] = OrderedDict()
        self.pinned: dict[bytes, int] = {}
        self.private = 0
        self.queue: deque[SimRequest] = deque()
        self.queued_uncached = 0
        self.batch: list[SimRequest] = []  # the prefill phase's requests
        self.phase_end = 0.0
        self.phase_rate = 0.0  # decode steps per second during the phase
        self.phase_tokens = 0
        self.decoding: list[tuple[float, int, SimRequest]] = []  # heap on finish progress
        self.n_decoding = 0
        self.sum_in = 0  # KV of the decoders: sum_in + B * progress - sum_join
        self.sum_join = 0.0
        self.progress = 0.0
        self.t_last = 0.0
        self.mode = IDLE
        self.step_s = 0.0
        self.version = 0  # bumps when the pending wake-up is replaced
        self.seq = 0
        self.events: list = []
        # measured speeds the worker reports (as a live worker measures its own)
        self.prefill_tps = 1.0 / (calib.per_token_s + calib.attn_s * 2048)
        self.last_step_s = calib.decode_step_s(1, 0)
        # accounting
        self.busy_s = 0.0
        self.busy_since = -1.0
        self.routed = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.output_tokens = 0
        self.started_at = 0.0
        self.stopped_at: float | None = None
        self.draining = False
        self.ready = True
        self.rejected = 0

    # ---- KV cache ------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return len(self.lru) + len(self.pinned) + self.private

    def kv_usage(self) -> float:
        return (len(self.pinned) + self.private) / self.cap

    def peek_hits(self, keys: list) -> int:
        """Leading blocks held in G1 (and G2): an estimate before admission."""
        n = 0
        pinned, lru, g2 = self.pinned, self.lru, self.g2
        for k in keys:
            if k in pinned or k in lru or k in g2:
                n += 1
            else:
                break
        return n

    def _admit(self, r: SimRequest) -> bool:
        keys, bs = r.keys, self.bs
        pinned, lru, g2 = self.pinned, self.lru, self.g2
        n1 = 0
        in_lru = 0
        for k in keys:
            if k in pinned:
                n1 += 1
            elif k in lru:
                n1 += 1
                in_lru += 1
            else:
                break
        n2 = 0
        if g2:
            for k in keys[n1:]:
                if k in g2:
                    n2 += 1
                else:
                    break
        total_blocks = -(-(r.input_len + r.out) // bs)
        private = max(0, total_blocks - len(keys))
        need = len(keys) - n1 + private
        free = self.cap - self.used_blocks
        if need > free + len(lru) - in_lru:
            if need > self.cap:  # can never fit here
                self.rejected += 1
                return False
            return False
        # pin the hits first so eviction cannot take them
        for k in keys[:n1]:
            if k in lru:
                del lru[k]
                pinned[k] = 1
            else:
                pinned[k] += 1
        evict = need - free
        if evict > 0:
            gone = []
            for _ in range(evict):
                k, _ = lru.popitem(last=False)
                gone.append(k)
            self.events.append(BlockRemoved(tuple(gone), "G1"))
            if self.g2_cap:
                self._to_g2(gone)
        new = keys[n1:]
        for k in new:
            pinned[k] = pinned.get(k, 0) + 1
        self.private += private
        r.private = private
        cap_hit = max(0, (r.input_len - 1) // bs)
        hit = min(n1 + n2, cap_hit)
        r.n_hit_g1 = min(n1, hit)
        r.g2_hits = hit - r.n_hit_g1
        r.cached = hit * bs
        r.uncached = r.input_len - r.cached
        return True

    def _to_g2(self, gone: list) -> None:
        g2 = self.g2
        added = []
        for k in gone:
            if k in g2:
                g2.move_to_end(k)
            else:
                g2[k] = None
                added.append(k)
        if added:
            self.events.append(BlockStored(tuple(added), None, "G2", len(added) * self.bs))
        drop = []
        while len(g2) > self.g2_cap:
            drop.append(g2.popitem(last=False)[0])
        if drop:
            self.events.append(BlockRemoved(tuple(drop), "G2"))

    def _release(self, r: SimRequest) -> None:
        pinned, lru = self.pinned, self.lru
        for k in reversed(r.keys):  # the tail goes first when memory runs short
            n = pinned[k] - 1
            if n:
                pinned[k] = n
            else:
                del pinned[k]
                lru[k] = None
        self.private -= r.private
        r.keys = None  # type: ignore[assignment]  # free memory at scale

    def take_events(self) -> EventBatch | None:
        if not self.events:
            return None
        self.seq += 1
        b = EventBatch(self.worker_id, self.seq, 0.0, self.events)
        self.events = []
        return b

    # ---- timeline ------------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        dt = now - self.t_last
        if dt > 0:
            if self.mode == PREFILL:
                self.progress += dt * self.phase_rate
            elif self.mode == DECODE:
                self.progress += dt / self.step_s
        self.t_last = now

    def kv_tokens(self) -> float:
        return self.sum_in + self.n_decoding * self.progress - self.sum_join

    def enqueue(self, r: SimRequest, now: float) -> None:
        est = self.peek_hits(r.keys)
        r.uncached = r.input_len - min(est, max(0, (r.input_len - 1) // self.bs)) * self.bs
        self.queue.append(r)
        self.queued_uncached += r.uncached
        self.routed += 1

    def start_decode(self, r: SimRequest, now: float) -> None:
        """A request whose prompt KV arrived from a prefill worker (disaggregation)."""
        self._advance(now)
        total_blocks = -(-(r.input_len + r.out) // self.bs)
        r.private = total_blocks
        self.private += total_blocks  # decode workers hold the transferred KV privately
        self.routed += 1
        self._join(r)

    def _join(self, r: SimRequest) -> None:
        r.join_progress = self.progress
        heapq.heappush(self.decoding, (self.progress + r.out - 1, r.idx, r))
        self.n_decoding += 1
        self.sum_in += r.input_len
        self.sum_join += self.progress

    def step(self, now: float, done: list, prefilled: list, firsts: list) -> float | None:
        """Bring the worker to ``now``: end the phase if due, finish decoders whose last token
        is due, start what comes next. Appends requests that got their first token to
        ``firsts``, finished ones to ``done`` and, for a prefill-only worker, requests whose
        prompt is computed to ``prefilled``. Returns the next wake-up time, None when idle."""
        self._advance(now)
        if self.mode == PREFILL and now >= self.phase_end - EPS:
            for r in self.batch:
                r.t_first = now
                firsts.append(r)
                self.output_tokens += 1
                if self.role == "prefill" or r.out <= 1:
                    # prefill-only workers hand the KV on; both free their copy here
                    if self.role == "prefill":
                        prefilled.append(r)
                    else:
                        r.t_done = now
                        done.append(r)
                    self._release(r)
                else:
                    self._join(r)
            self.batch = []
            self.phase_tokens = 0
            self.mode = IDLE
        heap = self.decoding
        while heap and heap[0][0] <= self.progress + EPS:
            _, _, r = heapq.heappop(heap)
            self.n_decoding -= 1
            self.sum_in -= r.input_len
            self.sum_join -= r.join_progress
            r.t_done = now
            self.output_tokens += r.out - 1
            done.append(r)
            if r.keys is not None:
                self._release(r)
            else:
                self.private -= r.private
        return self._schedule(now)

    def _schedule(self, now: float) -> float | None:
        c = self.c
        if self.mode != PREFILL and self.queue:
            self._start_phase(now)
        if self.mode == PREFILL:
            nxt = self.phase_end
            if self.decoding and self.phase_rate > 0:
                t = now + (self.decoding[0][0] - self.progress) / self.phase_rate
                nxt = min(nxt, t)
            self._busy(now, True)
            return max(nxt, now)
        if self.decoding:
            self.mode = DECODE
            self.step_s = c.decode_step_s(self.n_decoding, self.kv_tokens())
            self.last_step_s = self.step_s
            self._busy(now, True)
            return now + max(0.0, self.decoding[0][0] - self.progress) * self.step_s
        self.mode = IDLE
        self._busy(now, False)
        return None

    def _start_phase(self, now: float) -> None:
        c = self.c
        budget = c.max_num_batched_tokens
        batch: list[SimRequest] = []
        tokens = 0
        q = self.queue
        while q and self.n_decoding + len(batch) < c.max_num_seqs:
            r = q[0]
            if batch and tokens + r.uncached > budget:
                break
            est = r.uncached
            if not self._admit(r):
                if r.input_len + r.out > self.cap * self.bs:  # never fits: fail it
                    q.popleft()
                    self.queued_uncached -= est
                    r.t_first = r.t_done = -2.0
                    continue
                break
            q.popleft()
            self.queued_uncached -= est
            batch.append(r)
            tokens += r.uncached
        if not batch:
            return
        compute = 0.0
        bpt = c.kv_bytes_per_token
        g2_bw = c.tier_bytes_per_s.get("G2", 50e9)
        for r in batch:
            compute += c.prefill_s(r.uncached, r.cached)
            self.prompt_tokens += r.input_len
            self.cached_tokens += r.cached
            if r.g2_hits:
                compute += r.g2_hits * self.bs * bpt / g2_bw
        new = []
        for r in batch:
            # blocks this phase computes become visible to the router as stored blocks
            fresh = r.keys[r.n_hit_g1 :]
            if fresh:
                new.append((fresh, r.keys[r.n_hit_g1 - 1] if r.n_hit_g1 else None))
        for fresh, parent in new:
            self.events.append(BlockStored(tuple(fresh), parent, "G1", len(fresh) * self.bs))
        steps = max(1, -(-tokens // budget))
        dur = compute
        if self.n_decoding:
            # decoders ride along in the chunk's forward pass: they add their own tokens'
            # cost, not a second pass over the weights
            dur += steps * c.mixed_decode_s(self.n_decoding, self.kv_tokens())
            self.phase_rate = steps / dur
        else:
            self.phase_rate = 0.0
        if tokens:
            measured = tokens / max(compute, 1e-9)
            self.prefill_tps = ewma(self.prefill_tps, measured, 0.2)
        self.batch = batch
        self.phase_tokens = tokens
        self.phase_end = now + dur
        self.mode = PREFILL

    def _busy(self, now: float, busy: bool) -> None:
        if busy and self.busy_since < 0:
            self.busy_since = now
        elif not busy and self.busy_since >= 0:
            self.busy_s += now - self.busy_since
            self.busy_since = -1.0

    def close_busy(self, now: float) -> None:
        if self.busy_since >= 0:
            self.busy_s += now - self.busy_since
            self.busy_since = now

    def waiting_prefill_tokens(self) -> int:
        left = 0
        if self.mode == PREFILL and self.phase_tokens:
            left = self.phase_tokens  # not yet done (first tokens come at the phase end)
        return self.queued_uncached + left

    def num_active(self) -> int:
        return len(self.queue) + len(self.batch) + self.n_decoding

    def idle(self) -> bool:
        return not self.queue and not self.batch and not self.decoding
