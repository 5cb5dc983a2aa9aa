"""Wire codec of what workers publish to routers: KV event batches and load reports.

Messages travel as two ZeroMQ frames, ``[topic, msgpack payload]``, over PUB/SUB. Topics
let a subscriber take only what it needs. Event payloads are arrays rather than maps
because a busy worker sends many of them:

    kv:   [worker_id, epoch, seq, timestamp, [event, ...]]
          event = [0, keys, parent_key, tier, token_count]   BlockStored
                | [1, keys, tier]                             BlockRemoved
                | [2, tier]                                   AllCleared (tier nil: all)
    load: map of WorkerLoad fields (see kvgrid.router.workers)

``epoch`` names one life of a worker process: a restarted worker numbers from zero again
and the router must not mistake its events for the old life's.
"""

from __future__ import annotations

from typing import Any

import msgpack

from kvgrid.events import AllCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

TOPIC_KV = b"kv"
TOPIC_LOAD = b"load"

_STORED, _REMOVED, _CLEARED = 0, 1, 2


class WireError(ValueError):
    """A message that does not decode as a kvgrid event batch or load report."""


def _encode_event(ev: KVEvent) -> list:
    if isinstance(ev, BlockStored):
        return [_STORED, list(ev.keys), ev.parent_key, ev.tier, ev.token_count]
    if isinstance(ev, BlockRemoved):
        return [_REMOVED, list(ev.keys), ev.tier]
    if isinstance(ev, AllCleared):
        return [_CLEARED, ev.tier]
    raise TypeError(f"not a KV event: {ev!r}")


def _decode_event(raw: list) -> KVEvent:
    tag = raw[0]
    if tag == _STORED:
        return BlockStored(tuple(raw[1]), raw[2], raw[3], raw[4])
    if tag == _REMOVED:
        return BlockRemoved(tuple(raw[1]), raw[2])
    if tag == _CLEARED:
        return AllCleared(raw[1])
    raise WireError(f"unknown KV event tag {tag!r}")


def encode_batch(batch: EventBatch, epoch: str = "") -> bytes:
    return msgpack.packb(
        [
            batch.worker_id,
            epoch,
            batch.seq,
            batch.timestamp,
            [_encode_event(e) for e in batch.events],
        ],
        use_bin_type=True,
    )


def decode_batch(payload: bytes) -> tuple[EventBatch, str]:
    """(batch, epoch) from a ``kv`` payload."""
    try:
        worker_id, epoch, seq, ts, events = msgpack.unpackb(payload, raw=False)
        return EventBatch(worker_id, seq, ts, [_decode_event(e) for e in events]), epoch
    except WireError:
        raise
    except Exception as e:  # malformed bytes from the network: one clear error type
        raise WireError(f"bad KV event batch: {e}") from e


def encode_load(report: dict[str, Any]) -> bytes:
    return msgpack.packb(report, use_bin_type=True)


def decode_load(payload: bytes) -> dict[str, Any]:
    try:
        report = msgpack.unpackb(payload, raw=False)
    except Exception as e:
        raise WireError(f"bad load report: {e}") from e
    if not isinstance(report, dict) or "worker_id" not in report:
        raise WireError("load report must be a map with a worker_id")
    return report


def encode_snapshot(worker_id: str, epoch: str, seq: int, tiers: dict[str, list[bytes]]) -> bytes:
    """A worker's whole KV key set, consistent with event ``seq`` (the last one published)."""
    return msgpack.packb(
        {"worker_id": worker_id, "epoch": epoch, "seq": seq, "tiers": tiers}, use_bin_type=True
    )


def decode_snapshot(payload: bytes) -> dict[str, Any]:
    try:
        snap = msgpack.unpackb(payload, raw=False)
        if not isinstance(snap, dict) or not {"worker_id", "seq", "tiers"} <= snap.keys():
            raise WireError("snapshot must hold worker_id, seq and tiers")
        return snap
    except WireError:
        raise
    except Exception as e:
        raise WireError(f"bad snapshot: {e}") from e
