"""Prometheus metrics of a running server: requests, latency as vLLM defines it (time to first token,
inter-token latency, end-to-end), tokens, engine queues, guardrail actions and feedback ratings. `forja serve` exposes
them at GET /metrics; each app keeps its own registry so several servers can live in one process."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_TYPE = CONTENT_TYPE_LATEST

# vLLM's buckets, with finer steps at the low end for inter-token latency
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    """The server's metrics in their own registry; `engines` is read at every scrape for the queue gauges."""

    def __init__(self, engines: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("forja_requests", "HTTP requests by route template, model and status code.",
                                ["route", "model", "status"], registry=r)
        self.time_to_first_token = Histogram(
            "forja_time_to_first_token_seconds", "From the request's arrival to its first generated token.",
            ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "forja_inter_token_latency_seconds", "Between consecutive output tokens of one answer.",
            ["model"], buckets=ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "forja_e2e_request_latency_seconds", "From the request's arrival to its last generated token.",
            ["model"], buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("forja_prompt_tokens", "Prompt tokens processed (each distinct prompt once).",
                                     ["model"], registry=r)
        self.generation_tokens = Counter("forja_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.key_requests = Counter("forja_key_requests", "Answered requests by API key name.", ["key"], registry=r)
        self.key_tokens = Counter("forja_key_tokens", "Tokens by API key name and kind (prompt, completion).",
                                  ["key", "kind"], registry=r)
        self.feedback = Counter("forja_feedback_ratings", "Ratings left on answers, by the version that answered.",
                                ["version", "rating"], registry=r)
        self.guard_actions = Counter("forja_guard_actions", "Guardrail decisions by stage (input/output), category "
                                     "(pii, injection, S1-S14, ...) and action (block, redact, flag, allow).",
                                     ["stage", "category", "action"], registry=r)
        r.register(EngineLoad(engines))

    def key_usage(self, key: str | None, prompt_tokens: int, completion_tokens: int, requests: int = 1) -> None:
        from forja.keys import ANONYMOUS

        name = key or ANONYMOUS
        self.key_requests.labels(name).inc(requests)
        self.key_tokens.labels(name, "prompt").inc(prompt_tokens)
        self.key_tokens.labels(name, "completion").inc(completion_tokens)

    def scrape(self) -> bytes:
        return generate_latest(self.registry)


class EngineLoad(Collector):
    """Queue length and running sequences of every loaded engine, read when scraped."""

    def __init__(self, engines: Callable[[], dict[str, Any]]):
        self.engines = engines

    def collect(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("forja_queue_length", "Requests waiting for a batch slot.", labels=["model"])
        running = GaugeMetricFamily("forja_active_sequences", "Sequences being generated now.", labels=["model"])
        for name, engine in list(self.engines().items()):
            load = getattr(engine, "load", None) or {}
            waiting.add_metric([name], load.get("waiting", 0))
            running.add_metric([name], load.get("active", 0))
        yield waiting
        yield running


class AnswerTiming:
    """The token timing of one request with `streams` answers, fed every delta as it is consumed.

    As vLLM: TTFT is arrival → the first token of any answer, ITL the gaps between consecutive tokens of
    one answer (here: consecutive deltas carrying text, one token each unless a stop string held text
    back), e2e is arrival → the last token."""

    def __init__(self, metrics: Metrics, model: str, started: float):
        self.metrics, self.model, self.started = metrics, model, started
        self.last: dict[int, float] = {}
        self.recorded = False

    def delta(self, index: int, has_text: bool) -> None:
        if not has_text:
            return
        moment = time.perf_counter()
        if not self.last:
            self.metrics.time_to_first_token.labels(self.model).observe(moment - self.started)
        elif index in self.last:
            self.metrics.inter_token_latency.labels(self.model).observe(moment - self.last[index])
        self.last[index] = moment

    def finish(self, prompt_tokens: int, completion_tokens: int) -> None:
        """Once per request, when its answers are complete (or the client left)."""
        if self.recorded:
            return
        self.recorded = True
        self.metrics.e2e_latency.labels(self.model).observe(time.perf_counter() - self.started)
        self.metrics.prompt_tokens.labels(self.model).inc(prompt_tokens)
        self.metrics.generation_tokens.labels(self.model).inc(completion_tokens)


class CountRequests:
    """ASGI middleware: forja_requests_total by route template (not the raw path: bounded labels), the
    model a generating route put in `request.state.model`, and the status code sent; with `log`, also
    one log line per request (method, path, status, seconds; never the body: it may be private)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: logging.Logger | None = None):
        self.app, self.metrics, self.log = app, metrics, log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            model = (scope.get("state") or {}).get("model", "")
            self.metrics.requests.labels(route, model, str(status[0])).inc()
            if self.log is not None:
                self.log.info("%s %s %s %.3fs", scope["method"], scope["path"], status[0], time.perf_counter() - started)
