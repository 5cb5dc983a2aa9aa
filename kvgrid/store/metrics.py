"""Store metrics, per tier and per tenant, on a prometheus CollectorRegistry passed in.

Tenants are labelled by the first 12 hex digits of their tenant id (never the raw scope).
Counters are mirrored in a plain dict so ``stats()`` works without scraping.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LOAD_BUCKETS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def tenant_label(tid: bytes) -> str:
    return tid.hex()[:12]


class StoreMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        tt = ["tier", "tenant"]
        self._c = {
            "hits": Counter("kvgrid_store_hits", "blocks loaded from a tier", tt, registry=r),
            "misses": Counter(
                "kvgrid_store_misses",
                "block loads that found nothing usable, by reason",
                [*tt, "reason"],
                registry=r,
            ),
            "bytes_in": Counter(
                "kvgrid_store_bytes_in", "bytes written into a tier", tt, registry=r
            ),
            "bytes_out": Counter(
                "kvgrid_store_bytes_out", "bytes loaded out of a tier", tt, registry=r
            ),
            "evictions": Counter(
                "kvgrid_store_evictions",
                "objects removed from a tier, by reason (capacity, quota, ttl, corrupt)",
                ["tier", "reason"],
                registry=r,
            ),
            "integrity_failures": Counter(
                "kvgrid_store_integrity_failures",
                "objects that failed verification (header, checksum, decrypt, mismatch, codec)",
                ["tier", "kind"],
                registry=r,
            ),
            "writebacks": Counter(
                "kvgrid_store_g2_writebacks",
                "blocks copied into G2 on write-back, by mode (async: GPU side stream; sync)",
                ["mode"],
                registry=r,
            ),
            "errors": Counter(
                "kvgrid_store_errors",
                "store operations that failed with an error, by tier and operation (lookup, "
                "load, read); each is also logged",
                ["tier", "op"],
                registry=r,
            ),
            "tier_faults": Counter(
                "kvgrid_store_tier_faults",
                "times a tier was turned off, by reason (disk_full, read_only, permission, "
                "io_error, timeout, unreachable, bad_key)",
                ["tier", "reason"],
                registry=r,
            ),
            "writes_dropped": Counter(
                "kvgrid_store_writes_dropped",
                "writes not done, by reason (queue_full, quota, full, too_big, error, copy_failed)",
                ["tier", "reason"],
                registry=r,
            ),
            "g1_writebacks": Counter(
                "kvgrid_store_g1_writebacks",
                "blocks handed down from G1 (evicted, written through, preempted, at shutdown), "
                "by outcome (g2, already_stored, queued_below, dropped_full, not_admitted, "
                "outranked, copy_failed, error, deferred)",
                ["outcome"],
                registry=r,
            ),
            "lost_hits": Counter(
                "kvgrid_store_lost_hits",
                "blocks an admitted request recomputed although they were once stored, by "
                "reason (never written: not_written_<why>; evicted_<tier>; found but not "
                "loaded: not_loaded_plan, behind_miss, not_loaded_deadline, "
                "not_loaded_missing, not_loaded_error; in_flight)",
                ["reason"],
                registry=r,
            ),
            "writedown": Counter(
                "kvgrid_store_writedown",
                "blocks considered for the disk tiers, by tier and outcome (written, "
                "already_below, and skips: outranked, evicted_before_write, not_admitted, "
                "full, quota, error)",
                ["tier", "outcome"],
                registry=r,
            ),
            "prefetch": Counter(
                "kvgrid_store_prefetch_blocks",
                "blocks of queued requests planned for G2, by outcome (fetched, late: "
                "could not arrive before the GPU would compute them, failed)",
                ["outcome"],
                registry=r,
            ),
            "backpressure_s": Counter(
                "kvgrid_store_g2_backpressure_seconds",
                "seconds write-backs waited for a G2 slot to be released (instead of dropping)",
                registry=r,
            ),
        }
        self.load_seconds = Histogram(
            "kvgrid_store_load_seconds",
            "time to load one block from a tier",
            ["tier"],
            buckets=_LOAD_BUCKETS,
            registry=r,
        )
        self.capacity = Gauge("kvgrid_store_capacity_bytes", "tier capacity", ["tier"], registry=r)
        self.used = Gauge("kvgrid_store_used_bytes", "tier usage", ["tier"], registry=r)
        self.pinned = Gauge("kvgrid_store_pinned_blocks", "G2 blocks pinned", registry=r)
        self.backend_up = Gauge(
            "kvgrid_store_backend_up", "1 if the tier's backend is reachable", ["tier", "backend"],
            registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("kvgrid_store_io_in_flight", "background writes", registry=r)
        self.bandwidth = Gauge(
            "kvgrid_store_load_bytes_per_second", "measured load bandwidth", ["tier"], registry=r
        )
        self.counts: dict[tuple, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        c = self._c[name]
        (c.labels(**labels) if labels else c).inc(value)
        with self._lock:
            self.counts[(name, *sorted(labels.items()))] += value

    def total(self, name: str, **match: str) -> float:
        """Sum of a counter over the label values that match ``match``."""
        with self._lock:
            return sum(
                v
                for (n, *labels), v in self.counts.items()
                if n == name and all(dict(labels).get(k) == x for k, x in match.items())
            )

    def summary(self) -> dict[str, dict[str, float]]:
        """name -> "label=value,..." -> count, for stats() and the CLI."""
        out: dict[str, dict[str, float]] = defaultdict(dict)
        with self._lock:
            for (n, *labels), v in sorted(self.counts.items()):
                out[n][",".join(f"{k}={x}" for k, x in labels)] = v
        return dict(out)
