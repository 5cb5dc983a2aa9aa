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

from kvgrid.events import TIERS, AllCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

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


def _int(x: Any, what: str) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise WireError(f"{what} is {x!r}, not a non-negative integer")
    return x


def _tier(x: Any, none_ok: bool = False) -> str | None:
    if (x is None and none_ok) or x in TIERS:
        return x
    raise WireError(f"unknown tier {x!r}")


def _keys(x: Any) -> tuple[bytes, ...]:
    if not isinstance(x, (list, tuple)) or not all(isinstance(k, bytes) for k in x):
        raise WireError("block keys must be a list of byte strings")
    return tuple(x)


def _decode_event(raw: list) -> KVEvent:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise WireError(f"a KV event is a non-empty array, not {type(raw).__name__}")
    tag = raw[0]
    n = {_STORED: 5, _REMOVED: 3, _CLEARED: 2}.get(tag)
    if n is None:
        raise WireError(f"unknown KV event tag {tag!r}")
    if len(raw) != n:
        raise WireError(f"KV event {tag} has {len(raw)} fields, not {n}")
    if tag == _STORED:
        if raw[2] is not None and not isinstance(raw[2], bytes):
            raise WireError("a parent key is bytes or nil")
        return BlockStored(_keys(raw[1]), raw[2], _tier(raw[3]), _int(raw[4], "token_count"))
    if tag == _REMOVED:
        return BlockRemoved(_keys(raw[1]), _tier(raw[2]))
    return AllCleared(_tier(raw[1], none_ok=True))


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
        if not isinstance(worker_id, str) or not isinstance(epoch, str):
            raise WireError("worker id and epoch must be strings")
        if not isinstance(ts, (int, float)) or isinstance(ts, bool):
            raise WireError(f"timestamp is {ts!r}")
        if not isinstance(events, (list, tuple)):
            raise WireError("events must be an array")
        batch = EventBatch(worker_id, _int(seq, "seq"), ts, [_decode_event(e) for e in events])
        return batch, epoch
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
    if not isinstance(report, dict) or not isinstance(report.get("worker_id"), str):
        raise WireError("load report must be a map with a worker_id")
    for name, value in report.items():
        if name not in _LOAD_NUMBERS or value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise WireError(f"load report field {name} is {value!r}")
    bw = report.get("tier_bytes_per_s", {})
    if not isinstance(bw, dict) or not all(
        k in TIERS and isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
        for k, v in bw.items()
    ):
        raise WireError("tier_bytes_per_s must map tier names to positive numbers")
    if not isinstance(report.get("epoch", ""), str):
        raise WireError("epoch must be a string")
    return report


# numeric fields of a load report (kvgrid.router.workers.WorkerLoad): routing does arithmetic
# on them, so a wrong type must stop at the wire, not inside a decision
_LOAD_NUMBERS = frozenset(
    {
        "kv_seq", "num_running", "num_waiting", "waiting_prefill_tokens", "kv_usage",
        "num_kv_blocks", "prefill_tokens_per_s", "decode_step_s", "prefix_cache_queries",
        "prefix_cache_hits", "prompt_tokens", "generation_tokens", "num_preemptions",
        "timestamp",
    }
)  # fmt: skip


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
