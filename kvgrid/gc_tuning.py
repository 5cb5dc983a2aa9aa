"""Collector settings for kvgrid's long-lived processes (router, engine worker, benchmarks).

A router's index and an engine's model, graphs and pools are built once and live as long as
the process; a full collection would walk them again and again (on an 8B engine under the
store replay, collections stalled the engine thread 1-2 s per minute). Freezing them moves
them out of the collector's reach; the young generation is collected less often.
"""

from __future__ import annotations

import gc

# the young generation every 50,000 allocations instead of 700
THRESHOLDS = (50_000, 50, 100)


def tune_gc() -> None:
    """Freeze what exists now (call once start-up has built the long-lived state)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
