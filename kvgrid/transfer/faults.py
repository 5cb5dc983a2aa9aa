"""Fault injection on the sending side of transfers, for drills and tests of recovery.

A worker accepts faults only when started with ``--allow-fault-injection``; one set of
faults (``POST /debug/faults``) applies to the next transfer it starts, then is cleared.
Each mimics what the decode worker must survive: a block damaged on the way, a connection
that drops, a stream that stops without closing, a slow stream.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Faults:
    corrupt_block: int | None = None  # flip a byte in the payload of this block (index)
    drop_after: int | None = None  # close the connection after sending this many blocks
    stall_after: int | None = None  # send nothing after this many blocks; keep the socket
    delay_s: float = 0.0  # wait this long before each block

    @classmethod
    def from_dict(cls, d: dict) -> Faults:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(names)}")
        out = cls(**d)
        for f in ("corrupt_block", "drop_after", "stall_after"):
            v = getattr(out, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"{f} must be a block count (int >= 0)")
        if not isinstance(out.delay_s, (int, float)) or not 0 <= out.delay_s <= 60:
            raise ValueError("delay_s must be between 0 and 60 seconds")
        return out


class FaultSwitch:
    """The faults armed for the next transfer (thread-safe, one shot)."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self._next: Faults | None = None
        self._lock = threading.Lock()

    def arm(self, faults: Faults) -> None:
        if not self.allowed:
            raise PermissionError(
                "fault injection is off: start the worker with --allow-fault-injection"
            )
        with self._lock:
            self._next = faults

    def take(self) -> Faults:
        with self._lock:
            f, self._next = self._next, None
        return f or Faults()
