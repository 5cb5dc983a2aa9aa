"""Prometheus metrics of the frontend, named as vLLM names them where the meaning is the same
(``vllm:`` becomes ``kvgrid:``), plus the router's own.

Request metrics are observed here, where the client's latency is; engine gauges and counters
come from each worker's latest load report, labelled by worker.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from kvgrid.router.router import FRESHNESS, Router

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)


class _FromWorkers:
    """Reads the router's view of the fleet at scrape time."""

    def __init__(self, router: Router, model: str, link=None) -> None:
        self.router = router
        self.model = model
        self.link = link  # kvgrid.server.links.FleetLink: messages it dropped

    def collect(self):
        labels = ["model_name", "worker"]
        g = {
            "num_requests_running": GaugeMetricFamily(
                "kvgrid:num_requests_running", "Requests running on the worker", labels=labels
            ),
            "num_requests_waiting": GaugeMetricFamily(
                "kvgrid:num_requests_waiting", "Requests waiting on the worker", labels=labels
            ),
            "kv_cache_usage_perc": GaugeMetricFamily(
                "kvgrid:kv_cache_usage_perc", "G1 KV blocks in use (0..1)", labels=labels
            ),
        }
        c = {
            "prefix_cache_queries": CounterMetricFamily(
                "kvgrid:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                labels=labels,
            ),
            "prefix_cache_hits": CounterMetricFamily(
                "kvgrid:prefix_cache_hits",
                "Prompt tokens served from the prefix cache",
                labels=labels,
            ),
            "num_preemptions": CounterMetricFamily(
                "kvgrid:num_preemptions", "Requests preempted on the worker", labels=labels
            ),
            "steps": CounterMetricFamily(
                "kvgrid:engine_steps", "Forward passes the worker completed", labels=labels
            ),
            "computed_prompt_tokens": CounterMetricFamily(
                "kvgrid:computed_prompt_tokens",
                "Prompt tokens the worker computed (not served from G1 or the store)",
                labels=labels,
            ),
            "num_room_waits": CounterMetricFamily(
                "kvgrid:num_room_waits",
                "Admissions that waited for free G1 blocks",
                labels=labels,
            ),
        }
        store_s = CounterMetricFamily(
            "kvgrid:store_engine_thread_seconds",
            "Seconds the engine's thread spent in the context store, per call",
            labels=[*labels, "call"],
        )
        fresh = GaugeMetricFamily(
            "kvgrid:router_worker_freshness",
            "1 for the worker's current index freshness state (exact, predicted, stale, down)",
            labels=["worker", "state"],
        )
        for wid, w in self.router.workers.items():
            ld = w.load
            lv = [self.model, wid]
            g["num_requests_running"].add_metric(lv, ld.num_running if w.up else 0)
            g["num_requests_waiting"].add_metric(lv, ld.num_waiting if w.up else 0)
            g["kv_cache_usage_perc"].add_metric(lv, ld.kv_usage if w.up else 0.0)
            c["prefix_cache_queries"].add_metric(lv, ld.prefix_cache_queries)
            c["prefix_cache_hits"].add_metric(lv, ld.prefix_cache_hits)
            c["num_preemptions"].add_metric(lv, ld.num_preemptions)
            c["steps"].add_metric(lv, ld.steps)
            c["computed_prompt_tokens"].add_metric(lv, ld.computed_prompt_tokens)
            c["num_room_waits"].add_metric(lv, ld.num_room_waits)
            for call, sec in sorted(ld.store_engine_s.items()):
                store_s.add_metric([*lv, call], sec)
            state = self.router.freshness(wid)
            for s in FRESHNESS:
                fresh.add_metric([wid, s], 1.0 if s == state else 0.0)
        up = GaugeMetricFamily("kvgrid:router_workers_up", "Workers taking requests")
        up.add_metric([], sum(1 for w in self.router.workers.values() if w.up))
        counters = self.router.counters
        resync = CounterMetricFamily(
            "kvgrid:router_resyncs", "Snapshots requested after an event gap or a (re)join"
        )
        resync.add_metric([], counters["resyncs_requested"])
        lost = CounterMetricFamily("kvgrid:router_workers_lost", "Workers marked down")
        lost.add_metric([], counters["workers_lost"])
        events = CounterMetricFamily("kvgrid:router_index_events", "KV events applied")
        events.add_metric([], self.router.index.events_applied)
        bad = CounterMetricFamily(
            "kvgrid:router_bad_messages",
            "Messages from workers dropped (malformed, wrong worker, failed snapshots)",
            labels=["reason"],
        )
        for reason, n in sorted((self.link.bad_messages if self.link else {}).items()):
            bad.add_metric([reason], n)
        yield from g.values()
        yield from c.values()
        yield from (store_s, fresh, up, resync, lost, events, bad)


class FrontendMetrics:
    def __init__(self, router: Router, model: str, link=None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        m = ["model_name"]
        self.model = model
        self.ttft = Histogram(
            "kvgrid:time_to_first_token_seconds",
            "Time to first token",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvgrid:inter_token_latency_seconds",
            "Time between output chunks",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvgrid:e2e_request_latency_seconds",
            "Request latency",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "kvgrid:request_queue_time_seconds",
            "Time waiting for admission (tenant fair queue)",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_hist = Histogram(
            "kvgrid:request_prompt_tokens",
            "Prompt tokens per request",
            m,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.gen_hist = Histogram(
            "kvgrid:request_generation_tokens",
            "Generated tokens per request",
            m,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("kvgrid:prompt_tokens", "Prompt tokens", m, registry=r)
        self.generation_tokens = Counter(
            "kvgrid:generation_tokens", "Generated tokens", m, registry=r
        )
        self.cached_tokens = Counter(
            "kvgrid:prompt_tokens_cached",
            "Prompt tokens served from cache, as workers report",
            m,
            registry=r,
        )
        self.success = Counter(
            "kvgrid:request_success", "Finished requests", [*m, "finished_reason"], registry=r
        )
        self.errors = Counter(
            "kvgrid:request_errors", "Requests that ended in an error", [*m, "status"], registry=r
        )
        self.decision = Histogram(
            "kvgrid:router_decision_seconds",
            "Time the router spends choosing a worker",
            buckets=(1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
            registry=r,
        )
        self.predicted_cached = Counter(
            "kvgrid:router_predicted_cached_tokens",
            "Prompt tokens the router predicted cached",
            registry=r,
        )
        self.prediction_match = Counter(
            "kvgrid:router_prediction_matches",
            "Requests whose predicted cached tokens equal the worker's report",
            ["match"],
            registry=r,
        )
        self.migrations = Counter(
            "kvgrid:request_migrations",
            "Requests moved off a lost worker, by outcome (resumed on another worker; "
            "limit, unsupported, no_worker, failed: ended with an error)",
            [*m, "outcome"],
            registry=r,
        )
        self.migrated_requests = Counter(
            "kvgrid:migrated_requests",
            "Requests that lost a worker, by how they ended (completed, error, aborted)",
            [*m, "outcome"],
            registry=r,
        )
        self.tenant_requests = Counter(
            "kvgrid:tenant_requests", "Requests admitted per tenant", ["tenant"], registry=r
        )
        self.prefill_decisions = Counter(
            "kvgrid:prefill_decisions",
            "Where prompts were computed: remote (a prefill worker streams the KV) or local, "
            "by the reason the router gave",
            ["where", "reason"],
            registry=r,
        )
        self.prefill_failures = Counter(
            "kvgrid:prefill_failures",
            "Remote prefills the prefill worker did not run (unreachable, refused)",
            registry=r,
        )
        self.transfers = Counter(
            "kvgrid:kv_transfers",
            "KV transfers as the decode worker saw them end, by outcome",
            ["outcome"],
            registry=r,
        )
        self.transfer_bytes = Counter(
            "kvgrid:kv_transfer_bytes", "Object bytes that landed through KV transfers", registry=r
        )
        self.transfer_seconds = Histogram(
            "kvgrid:kv_transfer_seconds",
            "KV transfers from connection to their end",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.scale_actions = Counter(
            "kvgrid:autoscale_actions",
            "Workers started (add) and drained (drain) by the planner or an operator, per role",
            ["role", "action", "by"],
            registry=r,
        )
        self.scale_workers = Gauge(
            "kvgrid:autoscale_workers",
            "Serving workers per role (not draining)",
            ["role"],
            registry=r,
        )
        self.scale_target = Gauge(
            "kvgrid:autoscale_target_workers",
            "Workers per role the planner's last decision wanted (within the bounds)",
            ["role"],
            registry=r,
        )
        r.register(_FromWorkers(router, model, link))
