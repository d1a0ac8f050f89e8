"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per server.

Counters: requests by endpoint and HTTP status, prompt and generated tokens, KV bytes compression
saved (full minus kept, at each request's end), prompt tokens served from the store. Histograms: time
to first token and inter-token latency. Gauges, read from the engine loop when scraped: requests
running and waiting, KV pool bytes in use and its budget, prefill workspace bytes, parked requests.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.service import EngineLoop

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """Every metric of one server; ``render()`` is the text ``/metrics`` returns."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop = loop
        self.registry = r = CollectorRegistry()
        self.requests = Counter("slimkv_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("slimkv_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("slimkv_generated_tokens", "Tokens generated", registry=r)
        self.bytes_saved = Counter("slimkv_kv_bytes_saved", "KV bytes compression saved (full - kept, per request)",
                                   registry=r)
        self.store_hits = Counter("slimkv_store_hit_tokens", "Prompt tokens whose KV came from the store",
                                  registry=r)
        self.ttft = Histogram("slimkv_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("slimkv_inter_token_latency_seconds", "Time between streamed pieces", registry=r,
                             buckets=LATENCY_BUCKETS)
        gauges = {
            "slimkv_requests_running": ("Requests decoding or prefilling", "running"),
            "slimkv_requests_waiting": ("Requests waiting for admission", "waiting"),
            "slimkv_requests_parked": ("Requests parked in the swap space", "parked"),
            "slimkv_kv_pool_bytes": ("KV bytes the pool holds", "kv_used"),
            "slimkv_kv_pool_budget_bytes": ("The KV pool's budget", "kv_budget"),
            "slimkv_prefill_workspace_bytes": ("KV bytes of the request being prefilled", "prefill_used"),
        }
        for name, (doc, key) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda key=key: self.loop.stats()[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)
