"""What the router knows about each worker: identity, measured speeds, load, liveness."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from kvgrid import keys

_UNKNOWN_SCOPE = keys.KVScope("unknown", "unknown")

# Used until a worker has measured itself (fleet medians replace them as soon as any has).
DEFAULT_PREFILL_TOKENS_PER_S = 4000.0
DEFAULT_DECODE_STEP_S = 0.03
DEFAULT_TIER_BYTES_PER_S = {"G2": 20e9, "G3": 1.0e9, "G4": 0.5e9}


@dataclass(frozen=True)
class WorkerInfo:
    """Fixed for one life of a worker process (its /info)."""

    worker_id: str
    url: str = ""
    epoch: str = ""
    model: str = "default"
    scope: keys.KVScope = _UNKNOWN_SCOPE
    block_size: int = keys.DEFAULT_BLOCK_SIZE
    max_model_len: int = 2048
    bytes_per_block: int = 0  # KV bytes of one block (all layers), for tier load times
    max_num_batched_tokens: int = 2048
    events: bool = True  # False: no KV event stream; the router predicts from its decisions
    site: str = ""  # kvgrid.router.sites: the group of nodes it runs in ("": none named)
    role: str = "both"  # prefill | decode | both (its first; load reports carry changes)
    transfer_endpoint: str | None = None  # HOST:PORT it takes KV transfers on; None: none
    # the compute device it runs on (a GPU's UUID, HOST/cpu, or an operator's group name):
    # workers with the same one take turns on it ("": unknown, taken as its own)
    device: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        s = self.scope
        d["scope"] = {
            "model_fingerprint": s.model_fingerprint,
            "dtype": s.dtype,
            "layout_version": s.layout_version,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerInfo:
        d = dict(d)
        s = d.pop("scope", None)
        known = {f.name for f in fields(cls)}
        info = {k: v for k, v in d.items() if k in known}
        if s is not None:
            info["scope"] = keys.KVScope(s["model_fingerprint"], s["dtype"], s["layout_version"])
        return cls(**info)


@dataclass
class WorkerLoad:
    """A worker's periodic load report (also its heartbeat)."""

    worker_id: str = ""
    epoch: str = ""
    kv_seq: int = 0  # last KV event batch published before this report
    num_running: int = 0
    num_waiting: int = 0
    waiting_prefill_tokens: int = 0  # prompt tokens admitted or queued but not yet computed
    kv_usage: float = 0.0
    num_kv_blocks: int = 0
    prefill_tokens_per_s: float | None = None
    decode_step_s: float | None = None
    tier_bytes_per_s: dict[str, float] = field(default_factory=dict)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    num_preemptions: int = 0
    role: str = ""  # the worker's current role ("": as in its WorkerInfo)
    mixed_prefill_tokens: int | None = None  # prompt tokens a step that also decodes takes
    transfer_bytes_per_s: float | None = None  # measured stream bandwidth of transfers in
    transfer_setup_s: float | None = None  # measured connect + handshake of transfers out
    steps: int = 0  # forward passes completed (cumulative, as the three below)
    computed_prompt_tokens: int = 0  # prompt tokens computed, not loaded or cached
    num_room_waits: int = 0  # admissions that waited for free G1 blocks
    # the engine thread's seconds in the context store, per call (save, lookup, ...)
    store_engine_s: dict[str, float] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerLoad:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class InFlight:
    """A request the router sent and has not seen finish."""

    worker_id: str
    sent_at: float
    prompt_tokens: int
    uncached_tokens: int  # predicted prefill work it adds to the worker
    first_token: bool = False


@dataclass
class WorkerState:
    info: WorkerInfo
    up: bool = True
    draining: bool = False  # no new requests, in-flight ones finish (planner scale-down)
    load: WorkerLoad = field(default_factory=WorkerLoad)
    last_seen: float = 0.0  # router clock: last load report or event batch
    down_since: float | None = None
    inflight: dict[str, InFlight] = field(default_factory=dict)
    # running sums over `inflight`, kept incrementally: routing reads them for every worker
    _pending_prefill: int = 0
    _mine_decoding: int = 0
    # What this router has seen happen since the last load report, which still counts it:
    # requests that finished, and prompt tokens whose prefill ended (first token). Without
    # this, a worker whose requests all just finished still looks busy until its next
    # report, and clients that send together (a batch that finished in one step) all go
    # to the other worker: the two trade whole waves instead of sharing them.
    _finished_since_report: int = 0
    _prefilled_since_report: int = 0

    def set_load(self, report: WorkerLoad) -> None:
        self.load = report
        self._finished_since_report = self._prefilled_since_report = 0

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    @property
    def role(self) -> str:
        return self.load.role or self.info.role

    def add_inflight(self, request_id: str, r: InFlight) -> None:
        self.remove_inflight(request_id)
        self.inflight[request_id] = r
        self._pending_prefill += r.uncached_tokens

    def first_token(self, request_id: str) -> None:
        r = self.inflight.get(request_id)
        if r is not None and not r.first_token:
            r.first_token = True
            self._pending_prefill -= r.uncached_tokens
            self._prefilled_since_report += r.uncached_tokens
            self._mine_decoding += 1

    def remove_inflight(self, request_id: str, finished: bool = False) -> InFlight | None:
        """Forget a request; ``finished``: it ended at the worker (not re-sent elsewhere)."""
        r = self.inflight.pop(request_id, None)
        if r is not None:
            if r.first_token:
                self._mine_decoding -= 1
            else:
                self._pending_prefill -= r.uncached_tokens
            if finished:
                self._finished_since_report += 1
        return r

    def clear_inflight(self) -> None:
        self.inflight.clear()
        self._pending_prefill = self._mine_decoding = 0

    def pending_prefill_tokens(self) -> int:
        """Prefill work this router has sent there that has not produced a first token."""
        return self._pending_prefill

    def backlog_tokens(self) -> int:
        return self.loads()[0]

    def num_decoding(self) -> int:
        return self.loads()[1]

    def num_active(self) -> int:
        return self.loads()[2]

    def loads(self) -> tuple[int, int, int]:
        """(queued prefill tokens, decoding requests, active requests) in one call: routing
        reads all three for every candidate of every decision. The report covers every
        frontend's requests but lags (less what this router saw end since); our own record
        is current but covers only us. The larger is the safer estimate of each."""
        ld, done = self.load, self._finished_since_report
        return (
            max(ld.waiting_prefill_tokens - self._prefilled_since_report, self._pending_prefill),
            max(ld.num_running - done, self._mine_decoding),
            max(ld.num_running + ld.num_waiting - done, len(self.inflight)),
        )


class FleetSpeeds:
    """The fleet's median speeds (prefill tokens/s, decode step s): they stand in for workers
    that have not measured themselves yet.

    Speeds move slowly: after a change (``dirty``) they are recomputed at most once per
    load-report interval (``refresh_s``), not per decision (each recompute walks the fleet).
    """

    def __init__(self, refresh_s: float = 0.5) -> None:
        self.refresh_s = refresh_s
        self.dirty = True
        self._at = float("-inf")
        self._speeds = (DEFAULT_PREFILL_TOKENS_PER_S, DEFAULT_DECODE_STEP_S)

    def get(self, workers: Iterable[WorkerState], now: float) -> tuple[float, float]:
        if self.dirty and now - self._at >= self.refresh_s:
            up = [w.load for w in workers if w.up]
            pf = [ld.prefill_tokens_per_s for ld in up if ld.prefill_tokens_per_s]
            ds = [ld.decode_step_s for ld in up if ld.decode_step_s]
            self._speeds = (
                statistics.median(pf) if pf else DEFAULT_PREFILL_TOKENS_PER_S,
                statistics.median(ds) if ds else DEFAULT_DECODE_STEP_S,
            )
            self.dirty = False
            self._at = now
        return self._speeds
