"""Transfer metrics of one worker, on the registry its ``/metrics`` serves (the store's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_SECONDS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.transfers = Counter(
            "kvgrid_kv_transfers",
            "KV transfers between workers by side (send, receive) and outcome",
            ["side", "outcome"],
            registry=r,
        )
        self.bytes = Counter(
            "kvgrid_kv_transfer_bytes", "object bytes moved by KV transfers", ["side"], registry=r
        )
        self.blocks = Counter(
            "kvgrid_kv_transfer_blocks", "blocks moved by KV transfers", ["side"], registry=r
        )
        self.seconds = Histogram(
            "kvgrid_kv_transfer_seconds",
            "a transfer from connection to its end",
            ["side"],
            buckets=_SECONDS,
            registry=r,
        )
        self.tail = Histogram(
            "kvgrid_kv_transfer_tail_seconds",
            "what a transfer took after its prefill had finished (the part not overlapped)",
            buckets=_SECONDS,
            registry=r,
        )
        self.bandwidth = Gauge(
            "kvgrid_kv_transfer_bytes_per_second",
            "measured stream bandwidth of incoming transfers (EWMA)",
            registry=r,
        )
        self.active = Gauge(
            "kvgrid_kv_transfers_active", "transfers in flight", ["side"], registry=r
        )

    def outcome(self, side: str, outcome: str) -> None:
        self.transfers.labels(side, outcome).inc()
