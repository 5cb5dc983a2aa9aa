"""RecentDecisions: the router's short-lived memory of where it just sent which prefixes.

KV events arrive only after a worker has computed a block, so a burst of sibling requests
(an agent fanning out on one long prefix) would otherwise each look cold and scatter over
the fleet. Each decision records "worker w will hold these keys" for a few seconds; the
index's exact view takes over once the events arrive. Entries are keyed by the worker's
bit in the index so lookups combine with the index's masks.
"""

from __future__ import annotations

from collections import deque


class RecentDecisions:
    def __init__(self, ttl_s: float = 5.0) -> None:
        self.ttl_s = ttl_s
        self.masks: dict[bytes, int] = {}  # key -> bitmask of workers predicted to hold it
        self._until: dict[bytes, dict[int, float]] = {}  # key -> {worker bit: expiry}
        self._queue: deque[tuple[float, int, list[bytes]]] = deque()  # one entry per record

    def __len__(self) -> int:
        return sum(len(v) for v in self._until.values())

    def record(self, bit: int, keys: list[bytes], now: float) -> None:
        until = now + self.ttl_s
        flag = 1 << bit
        masks, exp = self.masks, self._until
        for k in keys:
            e = exp.get(k)
            if e is None:
                exp[k] = {bit: until}
                masks[k] = flag
            else:
                e[bit] = until
                masks[k] |= flag
        self._queue.append((until, bit, keys))

    def expire(self, now: float) -> None:
        q = self._queue
        if not q or q[0][0] > now:
            return
        exp, masks = self._until, self.masks
        while q and q[0][0] <= now:
            _, bit, keys = q.popleft()
            clear = ~(1 << bit)
            for k in keys:
                e = exp.get(k)
                if e is not None and e.get(bit, now + 1) <= now:  # not renewed since
                    # _drop, inlined: this loop sees every recorded key once
                    del e[bit]
                    if e:
                        masks[k] &= clear
                    else:
                        del exp[k]
                        del masks[k]

    def forget_worker(self, bit: int) -> None:
        for k, e in list(self._until.items()):
            if bit in e:
                self._drop(k, e, bit)

    def _drop(self, k: bytes, e: dict[int, float], bit: int) -> None:
        del e[bit]
        if e:
            self.masks[k] &= ~(1 << bit)
        else:
            del self._until[k]
            del self.masks[k]
