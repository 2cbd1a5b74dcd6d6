"""The server's Prometheus metrics, in a registry of its own (never prometheus_client's global one).

Latencies and token counts are observed as each request's news arrives;
what the scheduler knows (sequences running and waiting, KV blocks,
preemptions, prefix-cache hits) is read at scrape time from the engine
thread's latest `SchedulerStats` snapshot, without taking the engine's lock.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .engine_loop import EngineLoop, StepNews

PREFIX = "fastcodegen_"
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 1.0)


class ServerMetrics:
    """The metrics of one app; `render()` is the body of `GET /metrics`."""

    def __init__(self, engine_loop: EngineLoop):
        self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of the requests the engine ran", registry=self.registry
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Tokens generated (every sample of n and best_of)", registry=self.registry
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From a completion request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between two tokens of one completion",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_SchedulerCollector(engine_loop))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def tracker(self, start: float) -> "RequestTracker":
        """Observes one completion request that arrived at `start` (time.monotonic())."""
        return RequestTracker(self, start)


class RequestTracker:
    """Turns one request's news into token counts, its time to first token and its inter-token latencies."""

    def __init__(self, metrics: ServerMetrics, start: float):
        self._m = metrics
        self._start = start
        self._first_token = False
        self._prompts: set[int] = set()
        self._tokens: dict[tuple[int, int], int] = {}  # (prompt, completion index) -> tokens counted
        self._last: dict[tuple[int, int], float] = {}  # when that completion last got a token

    def observe(self, news: StepNews) -> None:
        for prompt, out in news.outputs:
            if prompt not in self._prompts:
                self._prompts.add(prompt)
                self._m.prompt_tokens.inc(len(out.prompt_token_ids))
            for c in out.outputs:
                key = (prompt, c.index)
                new = len(c.token_ids) - self._tokens.get(key, 0)
                if new <= 0:
                    continue
                self._tokens[key] = len(c.token_ids)
                self._m.generation_tokens.inc(new)
                if not self._first_token:
                    self._first_token = True
                    self._m.time_to_first_token.observe(news.time - self._start)
                if key in self._last:
                    for _ in range(new):
                        self._m.inter_token_latency.observe((news.time - self._last[key]) / new)
                self._last[key] = news.time


class _SchedulerCollector:
    """Gauges and counters read from the engine thread's latest scheduler snapshot at scrape time."""

    def __init__(self, engine_loop: EngineLoop):
        self._loop = engine_loop

    def describe(self):
        return []  # computed at scrape time; nothing to check at registration

    def collect(self):
        s = self._loop.stats
        gauges = (
            ("num_sequences_running", "Sequences running (each sample of a request's n counts)", s.num_running),
            (
                "num_requests_waiting",
                "Requests waiting for the engine: received, or queued and not yet scheduled",
                self._loop.num_waiting,
            ),
            ("kv_cache_usage", "Fraction of the KV cache's blocks held by sequences", _usage(s)),
            ("kv_cache_free_blocks", "KV blocks no sequence holds (cached prefixes included)", s.num_free_blocks),
            ("kv_cache_blocks", "KV blocks in the cache", s.num_blocks),
            ("spec_acceptance_rate", "Share of speculative proposals kept (0 without speculation)", s.acceptance_rate),
            (
                "spec_mean_accepted_length",
                "Speculative proposals kept per verifying sequence and step",
                s.mean_accepted_length,
            ),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = (
            ("preemptions", "Sequences preempted for want of KV blocks", s.preemptions),
            ("prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache", s.prefix_hit_tokens),
            ("computed_tokens", "Tokens run through the model", s.computed_tokens),
            ("spec_proposed_tokens", "Speculative proposals verified", s.spec_proposed),
            ("spec_accepted_tokens", "Speculative proposals kept", s.spec_accepted),
            ("spec_verify_runs", "Sequences that verified proposals in a step", s.spec_runs),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


def _usage(s) -> float:
    return 0.0 if s.num_blocks == 0 else (s.num_blocks - s.num_free_blocks) / s.num_blocks
