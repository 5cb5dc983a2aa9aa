"""EngineLoop: one thread owns the engine; everything else talks to it through commands.

The engine is not thread-safe and one step can take a long time on a CPU, so HTTP handlers
never touch it: they queue commands (add, abort, snapshot) with a future for the answer, and
receive outputs through their asyncio queue. After each step the thread publishes the step's
KV events as one numbered batch and refreshes its load report. The heartbeat (the load report
every ``load_interval_s``) runs on a thread of its own: one step of a long prefill on a CPU
can take longer than the router's heartbeat timeout, and a busy worker is not a dead one. It
stops when the engine thread dies, so that the router marks the worker down. It keeps a
mirror of the keys it announced, per tier, so a snapshot is exactly consistent with the last
sequence number.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from kvgrid.events import TIERS, AllCleared, BlockRemoved, BlockStored, EventBatch, KVEvent

log = logging.getLogger(__name__)

Sink = Callable[[Any], None]  # receives RequestOutput, or an Exception when the engine fails


class EngineLoop(threading.Thread):
    def __init__(
        self,
        engine: Any,
        worker_id: str,
        epoch: str,
        publish_events: Callable[[EventBatch], None] | None = None,
        publish_load: Callable[[dict], None] | None = None,
        load_interval_s: float = 0.5,
    ) -> None:
        super().__init__(name=f"engine-{worker_id}", daemon=True)
        self.engine = engine
        self.worker_id = worker_id
        self.epoch = epoch
        self.publish_events = publish_events
        self.publish_load = publish_load
        self.load_interval_s = load_interval_s
        self.seq = 0
        self.mirror: list[set[bytes]] = [set() for _ in TIERS]
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._stopping = threading.Event()
        self._last_load = float("-inf")
        self._report: dict | None = None  # the latest load report, refreshed by the engine
        self._beat = threading.Thread(target=self._heartbeat, name=f"beat-{worker_id}", daemon=True)
        self.failed: BaseException | None = None
        self.beat = time.monotonic()  # the thread's last pass through its loop
        # called on this thread after every turn of the loop (a KV transfer's sender
        # collects the blocks the step named); exceptions are logged, never fatal
        self.after_step: list[Callable[[], None]] = []
        # more fields for the load report (a worker's role, its transfer measurements)
        self.load_extra: list[Callable[[], dict]] = []

    # ---- called from other threads -------------------------------------------------------

    def submit(self, fn: Callable[[], Any]) -> Future:
        fut: Future = Future()
        self._cmds.put((fn, fut))
        return fut

    async def call(self, fn: Callable[[], Any], timeout_s: float | None = 60.0) -> Any:
        """Run ``fn`` on the engine thread; TimeoutError if it has not run by ``timeout_s``
        (the thread is stuck in a step): it is then never run."""
        fut = self.submit(fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            fut.cancel()
            raise

    def stalled_for(self) -> float:
        """Seconds the thread has been in one step while it has work (0 when idle)."""
        if not self.engine.has_unfinished_requests():
            return 0.0
        return max(0.0, time.monotonic() - self.beat)

    async def add_request(
        self,
        request_id: str,
        prompt: list[int],
        params,
        tenant: bytes,
        sink: Sink,
        shared_prefix_tokens: int = 0,
        **resume,
    ) -> None:
        """``resume``: ``resume_output`` and ``emitted_text_len`` (LLMEngine.add_request)."""

        def add() -> None:
            self.engine.add_request(
                request_id,
                prompt,
                params,
                tenant=tenant,
                shared_prefix_tokens=shared_prefix_tokens,
                **resume,
            )
            self._sinks[request_id] = sink

        await self.call(add)

    def abort(self, request_id: str) -> Future:
        def abort() -> bool:
            self._sinks.pop(request_id, None)
            return self.engine.abort_request(request_id)

        return self.submit(abort)

    async def snapshot(self) -> tuple[int, dict[str, list[bytes]]]:
        return await self.call(
            lambda: (self.seq, {t: list(self.mirror[i]) for i, t in enumerate(TIERS)})
        )

    def start(self) -> None:
        super().start()
        self._beat.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop after the current step and wait for it: whoever closes the publisher and the
        engine next must not race a step still running on this thread."""
        self._stopping.set()
        self._cmds.put((lambda: None, Future()))
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)
        if self._beat.is_alive() and threading.current_thread() is not self._beat:
            self._beat.join(timeout_s)

    # ---- the thread ----------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._refresh_report()  # the heartbeat has something to send from the start
            self.engine.warm_thread()  # requests queue meanwhile; the first is not delayed
            while not self._stopping.is_set():
                self.beat = time.monotonic()
                busy = self.engine.has_unfinished_requests()
                self._run_commands(block=not busy)
                outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
                self._publish_events()  # before outputs: the router learns blocks first
                for out in outputs:
                    sink = self._sinks.get(out.request_id)
                    if out.finished:
                        self._sinks.pop(out.request_id, None)
                    if sink is not None:
                        sink(out)
                for hook in self.after_step:
                    try:
                        hook()
                    except Exception:
                        log.exception("after-step hook failed")
                self._refresh_report()
        except BaseException as e:  # the engine broke: fail every stream, then stop
            log.exception("engine loop failed")
            self.failed = e
            for sink in self._sinks.values():
                sink(e)
            self._sinks.clear()

    def _run_commands(self, block: bool) -> None:
        timeout = self.load_interval_s if block else None
        while True:
            try:
                if timeout is not None:
                    fn, fut = self._cmds.get(timeout=timeout)
                    timeout = None
                else:
                    fn, fut = self._cmds.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except Exception as e:
                    fut.set_exception(e)

    def _publish_events(self) -> None:
        events: list[KVEvent] = self.engine.drain_kv_events()
        if not events:
            return
        for ev in events:
            if isinstance(ev, BlockStored):
                self.mirror[TIERS.index(ev.tier)].update(ev.keys)
            elif isinstance(ev, BlockRemoved):
                self.mirror[TIERS.index(ev.tier)].difference_update(ev.keys)
            elif isinstance(ev, AllCleared):
                for i, t in enumerate(TIERS):
                    if ev.tier in (None, t):
                        self.mirror[i].clear()
        self.seq += 1
        if self.publish_events is not None:
            self.publish_events(EventBatch(self.worker_id, self.seq, time.time(), events))

    def idle_report(self) -> dict:
        """What must return to idle once no request is in flight (on the engine thread):
        requests, G1 blocks held by requests, store pins, leases and background I/O."""
        st = self.engine.stats()
        out = {
            "num_running": st.get("num_running", 0),
            "num_waiting": st.get("num_waiting", 0),
            "sinks": len(self._sinks),
            "g1_blocks_in_use": round(st.get("kv_usage", 0.0) * st.get("num_kv_blocks", 0)),
            "g1_blocks": st.get("num_kv_blocks", 0),
        }
        conn = getattr(self.engine, "connector", None)
        if conn is not None:
            store = conn.store
            out["store"] = {
                "pinned_blocks": store.g2.pinned_count() if store.g2 else 0,
                "leases": len(store.leases.active) if store.leases else 0,
                "writes_in_flight": store.writes.in_flight,
                "prefetches_in_flight": store.reads.in_flight,
                "tiers": {t.name: {"up": t.up, "fault": t.fault} for t in store.lower}
                | {name: {"up": False, "fault": why} for name, why in store.disabled.items()},
            }
        return out

    def load_report(self) -> dict:
        st = self.engine.stats()
        conn = getattr(self.engine, "connector", None)
        tier_bw = dict(getattr(conn, "tier_bytes_per_s", None) or {})
        report = {
            "worker_id": self.worker_id,
            "epoch": self.epoch,
            "kv_seq": self.seq,
            "num_running": st.get("num_running", 0),
            "num_waiting": st.get("num_waiting", 0),
            "waiting_prefill_tokens": st.get("waiting_prefill_tokens", 0),
            "kv_usage": st.get("kv_usage", 0.0),
            "num_kv_blocks": st.get("num_kv_blocks", 0),
            "prefill_tokens_per_s": st.get("prefill_tokens_per_s"),
            "decode_step_s": st.get("decode_step_s"),
            "tier_bytes_per_s": tier_bw,
            "prefix_cache_queries": st.get("prefix_cache_queries", 0),
            "prefix_cache_hits": st.get("prefix_cache_hits", 0),
            "prompt_tokens": st.get("prompt_tokens", 0),
            "generation_tokens": st.get("generation_tokens", 0),
            "num_preemptions": st.get("num_preemptions", 0),
            # guided decoding: host time of a step's token masks (EWMA), tokens a grammar
            # refused (sampled outside their mask: a fault, logged by the engine)
            "guided_mask_s": st.get("guided_mask_s"),
            "guided_errors": st.get("guided_errors", 0),
            "mixed_prefill_tokens": st.get("mixed_prefill_tokens"),
            # where a worker's time goes under load (cumulative): steps completed, prompt
            # tokens computed, admissions that waited for G1 room, the engine thread's
            # seconds in the context store
            "steps": st.get("steps", 0),
            "computed_prompt_tokens": st.get("computed_prompt_tokens", 0),
            "num_room_waits": st.get("num_room_waits", 0),
            "store_engine_s": st.get("store_engine_s", {}),
            "timestamp": time.time(),
        }
        for extra in self.load_extra:
            report.update(extra())
        return report

    def _refresh_report(self) -> None:
        now = time.monotonic()
        if now - self._last_load < self.load_interval_s / 2:
            return
        self._last_load = now
        self._report = self.load_report()

    def _heartbeat(self) -> None:
        """The load report every ``load_interval_s``, whatever the engine thread is doing;
        ``kv_seq`` is the seq of the engine's last published batch (the publisher's to set
        under its lock, so that a report never runs ahead of the batches it counts)."""
        while not self._stopping.wait(self.load_interval_s):
            if self.failed is not None or not self.is_alive():
                return  # a dead engine must look dead to the router
            report = self._report
            if report is None or self.publish_load is None:
                continue
            try:
                self.publish_load({**report, "timestamp": time.time()})
            except Exception:
                log.exception("heartbeat: publishing the load report failed")
