"""Fault injection points inside worker processes, for fault-injection campaigns
(`kvgrid chaos`): KV event batches dropped, duplicated, reordered or garbled on their way
out of a worker, and a slow disk (a delay before each object read of a disk tier).

Faults that the operating system can produce are injected from outside (signals, network
namespaces, full or read-only filesystems, damaged files); these two cannot be, short of a
kernel module. They are off unless the worker was started with ``--allow-fault-injection``
(``enable``), and then set through its authenticated ``POST /internal/faults``.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from dataclasses import dataclass

ENABLED = False  # only a process that called enable() (a drill) takes faults


@dataclass(frozen=True)
class Faults:
    event_drop: float = 0.0  # probability that a KV event batch is never sent
    event_dup: float = 0.0  # ... sent twice
    event_reorder: float = 0.0  # ... held back and sent after the next one
    event_garble: float = 0.0  # ... sent with random bytes overwritten
    disk_read_delay_s: float = 0.0  # sleep before every object read of a disk tier (G3, G4 fs)
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("event_drop", "event_dup", "event_reorder", "event_garble"):
            p = getattr(self, f)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{f} must be a probability in [0, 1], got {p!r}")
        d = self.disk_read_delay_s
        if not isinstance(d, (int, float)) or not 0.0 <= d <= 60.0:
            raise ValueError(f"disk_read_delay_s must be in [0, 60], got {d!r}")

    @property
    def events(self) -> bool:
        return any((self.event_drop, self.event_dup, self.event_reorder, self.event_garble))


_active = Faults()
_lock = threading.Lock()
_rng = random.Random(0)


def enable() -> None:
    global ENABLED
    ENABLED = True


def active() -> Faults:
    return _active


def set_active(spec: dict) -> Faults:
    """Replace the active faults (fields of ``Faults``; the ones left out are off)."""
    global _active, _rng
    if not ENABLED:
        raise PermissionError(
            "fault injection is off: start the worker with --allow-fault-injection"
        )
    names = {f.name for f in dataclasses.fields(Faults)}
    unknown = set(spec) - names
    if unknown:
        raise ValueError(f"unknown fault fields {sorted(unknown)}; known: {sorted(names)}")
    f = Faults(**spec)
    with _lock:
        _active, _rng = f, random.Random(f.seed)
    return f


def chance(p: float) -> bool:
    if p <= 0.0:
        return False
    with _lock:
        return _rng.random() < p


def garble(payload: bytes) -> bytes:
    """``payload`` with a few random bytes overwritten (a bad link or a buggy peer)."""
    data = bytearray(payload)
    with _lock:
        for _ in range(max(1, len(data) // 64)):
            data[_rng.randrange(len(data))] = _rng.randrange(256)
    return bytes(data)
