"""/metrics for operators: the server's counters in Prometheus text format (prometheus_client).

    t5x_like_http_requests_total{route, status}     responses by route and status code
    t5x_like_prompt_tokens_total, t5x_like_generated_tokens_total
    t5x_like_queue_depth, t5x_like_slots_busy, t5x_like_slots   requests waiting, rows decoding
    t5x_like_time_to_first_token_seconds            submit -> first generated token
    t5x_like_inter_token_latency_seconds            device time per decode step
    t5x_like_request_duration_seconds               submit -> last token
    t5x_like_jax_compilations_total                 programs compiled or loaded from the
                                                    persistent cache (this process)
    t5x_like_jax_compilation_cache_hits_total       of those, loaded from the cache
    t5x_like_jax_compilations_since_ready           compilations after the engine warmed up
    t5x_like_ready                                  1 once every program is compiled

Each app has its own registry (tests build several apps in one process); the compilation
counts are the process's, from JAX's monitoring events.
"""

import threading

import jax
import prometheus_client as prom
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from t5x_like.serving import engine as engine_lib

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # every executable built
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_counts = {"programs": 0, "cache_hits": 0, "seconds": 0.0}
_watching = threading.Lock()
_watched = False

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
STEP_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)


def watch_compilations() -> None:
    """Counts every compilation of this process from now on (idempotent)."""
    global _watched
    with _watching:
        if _watched:
            return
        _watched = True

    def on_duration(event, duration, **_):
        if event == _COMPILE_EVENT:
            _counts["programs"] += 1
            _counts["seconds"] += duration

    def on_event(event, **_):
        if event == _CACHE_HIT_EVENT:
            _counts["cache_hits"] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)


def compilations() -> int:
    """Programs built so far by this process (compiled, or loaded from the persistent cache)."""
    return _counts["programs"]


class _Compilations:
    def __init__(self, server: "ServerMetrics"):
        self.server = server

    def collect(self):
        yield CounterMetricFamily("t5x_like_jax_compilations", "Programs compiled by XLA or "
                                  "loaded from the persistent compilation cache.",
                                  value=_counts["programs"])
        yield CounterMetricFamily("t5x_like_jax_compilation_cache_hits", "Programs loaded from "
                                  "the persistent compilation cache.", value=_counts["cache_hits"])
        yield CounterMetricFamily("t5x_like_jax_compilation_seconds", "Time spent building "
                                  "programs.", value=_counts["seconds"])
        since = self.server.compilations_since_ready()
        yield GaugeMetricFamily("t5x_like_jax_compilations_since_ready", "Programs built after "
                                "the engine was ready (0 when no request waits for a compile).",
                                value=since if since is not None else 0)


class ServerMetrics(engine_lib.Observer):
    def __init__(self, scheduler=None, slots: int = 0):
        watch_compilations()
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.requests = prom.Counter("t5x_like_http_requests", "Responses, by route and status.",
                                     ["route", "status"], registry=r)
        self.prompt_tokens = prom.Counter("t5x_like_prompt_tokens", "Prompt tokens of finished "
                                          "requests.", registry=r)
        self.generated_tokens = prom.Counter("t5x_like_generated_tokens", "Tokens generated.",
                                             registry=r)
        self.ttft = prom.Histogram("t5x_like_time_to_first_token_seconds", "From a request's "
                                   "arrival at the engine to its first token.",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.itl = prom.Histogram("t5x_like_inter_token_latency_seconds", "Device call time "
                                  "per decode step (every live row gets a token per step).",
                                  buckets=STEP_BUCKETS, registry=r)
        self.duration = prom.Histogram("t5x_like_request_duration_seconds", "From a request's "
                                       "arrival at the engine to its last token.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self._scheduler = None
        self._ready_at: int | None = None
        prom.Gauge("t5x_like_queue_depth", "Requests waiting for a slot.", registry=r
                   ).set_function(lambda: self._scheduler.queued if self._scheduler else 0)
        prom.Gauge("t5x_like_slots_busy", "Rows decoding now.", registry=r
                   ).set_function(lambda: self._scheduler.busy if self._scheduler else 0)
        prom.Gauge("t5x_like_slots", "Rows the device decodes together.", registry=r).set(slots)
        prom.Gauge("t5x_like_ready", "1 once every program is compiled.", registry=r
                   ).set_function(lambda: float(self.ready()))
        r.register(_Compilations(self))
        self.attach(scheduler)

    def attach(self, scheduler) -> None:
        self._scheduler = scheduler
        if scheduler is not None and scheduler.state == "ready":  # static batching: no warm-up
            self._ready_at = compilations()

    def ready(self) -> bool:
        return self._scheduler is not None and self._scheduler.state == "ready"

    def compilations_since_ready(self) -> int | None:
        return None if self._ready_at is None else compilations() - self._ready_at

    # engine.Observer
    def warmed_up(self, seconds: float) -> None:
        self._ready_at = compilations()

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def step_time(self, seconds_per_token: float, steps: int) -> None:
        for _ in range(steps):
            self.itl.observe(seconds_per_token)

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens.inc(prompt)
        self.generated_tokens.inc(generated)

    def finished(self, request, seconds: float) -> None:
        self.duration.observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
