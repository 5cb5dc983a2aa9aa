"""KV events: what a worker tells the router about blocks it stored or dropped.

The shape follows vLLM's KV events (BlockStored / BlockRemoved / AllCleared in numbered
batches) so the router can follow other engines too. Tiers are named G1 (GPU) .. G4
(shared). Wire encoding (msgpack over ZeroMQ PUB/SUB) lives with the publisher.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TIERS = ("G1", "G2", "G3", "G4")


@dataclass(frozen=True)
class BlockStored:
    keys: tuple[bytes, ...]
    parent_key: bytes | None
    tier: str
    token_count: int  # tokens covered by `keys` (len(keys) * block_size)


@dataclass(frozen=True)
class BlockRemoved:
    keys: tuple[bytes, ...]
    tier: str


@dataclass(frozen=True)
class AllCleared:
    tier: str | None = None  # None: every tier


KVEvent = BlockStored | BlockRemoved | AllCleared


@dataclass
class EventBatch:
    worker_id: str
    seq: int  # numbered per worker, gap-free; a gap makes the router resynchronise
    timestamp: float
    events: list[KVEvent] = field(default_factory=list)
