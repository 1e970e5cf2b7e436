"""Per-request timing and Prometheus metrics for the serving layer."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPS_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
COUNT_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256)
RATIO_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
TRANSFER_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
BYTES_BUCKETS = (64, 1024, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
MAX_LINK_LABELS = 64  # peers a node keeps link series for (a pipeline has few)


@dataclass
class RequestTimer:
    """Timestamps of one request (`time.perf_counter()` seconds) and its completion tokens."""

    created: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0

    def mark_tokens(self, count: int = 1, now: float | None = None) -> None:
        """Record `count` new completion tokens (the first call sets `first_token_at`)."""
        if count <= 0:
            return
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter() if now is None else now
        self.completion_tokens += count

    def finish(self, now: float | None = None) -> None:
        """Record the end of the request (idempotent: the first call wins)."""
        if self.finished_at is None:
            self.finished_at = time.perf_counter() if now is None else now

    @property
    def ttft_s(self) -> float | None:
        """Seconds from creation to the first token, or None before it."""
        if self.first_token_at is None:
            return None
        return max(0.0, self.first_token_at - self.created)

    @property
    def duration_s(self) -> float:
        """Seconds from creation to finish (or to now while running)."""
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return max(0.0, end - self.created)

    @property
    def tps(self) -> float:
        """Decode speed: tokens after the first one / seconds after the first token.

        With fewer than two tokens (or no decode time) it falls back to tokens / whole duration,
        and to 0.0 when that is zero too.
        """
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        n = self.completion_tokens
        if self.first_token_at is not None and n >= 2:
            decode_s = end - self.first_token_at
            if decode_s > 0:
                return (n - 1) / decode_s
        duration = end - self.created
        return n / duration if n > 0 and duration > 0 else 0.0

    def metrics_dict(self) -> dict[str, float | None]:
        """`{"ttft_ms", "tps", "duration_ms"}` for responses (ttft_ms is None without a token)."""
        ttft = self.ttft_s
        return {
            "ttft_ms": None if ttft is None else round(ttft * 1000.0, 2),
            "tps": round(self.tps, 2),
            "duration_ms": round(self.duration_s * 1000.0, 2),
        }


class ServingMetrics:
    """Prometheus metrics of one server, in a registry of its own (safe for many apps per process).

    Names are prefixed with `namespace` (default "parallax"), e.g. `parallax_requests_total`.
    """

    def __init__(self, namespace: str = "parallax") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "requests",
            "Finished chat requests by HTTP status and finish reason",
            ["status", "finish_reason"],
            namespace=namespace,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "prompt_tokens", "Prompt tokens processed", namespace=namespace, registry=r
        )
        self.generation_tokens = Counter(
            "generation_tokens", "Completion tokens generated", namespace=namespace, registry=r
        )
        self.ttft = Histogram(
            "time_to_first_token_seconds",
            "Time from request arrival to its first token",
            namespace=namespace,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tps = Histogram(
            "tokens_per_second",
            "Per-request decode speed (completion tokens per second)",
            namespace=namespace,
            buckets=TPS_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "request_duration_seconds",
            "Time from request arrival to its end",
            namespace=namespace,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.running = Gauge(
            "num_requests_running", "Requests being generated", namespace=namespace, registry=r
        )
        self.waiting = Gauge(
            "num_requests_waiting", "Requests waiting to start", namespace=namespace, registry=r
        )
        self._step_metrics(namespace)

    def _step_metrics(self, ns: str) -> None:
        """This node's engine steps and activation links (ExecutorStats, LinkSample)."""
        r = self.registry
        self.step_time = Histogram("step_seconds", "Wall time of one engine step of this node",
                                   namespace=ns, buckets=STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("batch_size", "Requests in one engine step", namespace=ns,
                                    buckets=COUNT_BUCKETS, registry=r)
        self.queue_depth = Histogram("queue_depth", "Requests waiting after an engine step",
                                     namespace=ns, buckets=COUNT_BUCKETS, registry=r)
        self.prefix_hit_ratio = Histogram(
            "prefix_cache_hit_ratio", "Share of the prompt tokens prefilled between two steps "
            "that the prefix cache held (steps that prefilled prompt tokens)", namespace=ns,
            buckets=RATIO_BUCKETS, registry=r)
        self.link_transfer = Histogram(
            "link_transfer_seconds", "Transfer time of one stage message to a peer: the round "
            "trip of its ack less the peer's own time", ["peer"], namespace=ns,
            buckets=TRANSFER_BUCKETS, registry=r)
        self.link_bytes = Histogram("link_bytes", "Bytes of one stage message to a peer",
                                    ["peer"], namespace=ns, buckets=BYTES_BUCKETS, registry=r)
        self._peers: set[str] = set()
        self._last_counts = (0, 0)  # (prefill tokens, prefix hit tokens) at the last step

    def observe_step(self, stats, links=()) -> None:
        """One StepOutputs' `stats` (protocol.ExecutorStats) and link samples."""
        if stats.step_ms > 0:
            self.step_time.observe(stats.step_ms / 1000.0)
            self.batch_size.observe(stats.num_batched)
            self.queue_depth.observe(stats.num_waiting)
        prefill, hits = stats.num_prefill_tokens, stats.num_prefix_hit_tokens
        new_prefill = prefill - self._last_counts[0]
        new_hits = hits - self._last_counts[1]
        if new_prefill < 0 or new_hits < 0:  # a restarted executor counts from zero again
            new_prefill, new_hits = prefill, hits
        self._last_counts = (prefill, hits)
        if new_prefill > 0:
            self.prefix_hit_ratio.observe(new_hits / (new_hits + new_prefill))
        for sample in links:
            if sample.peer not in self._peers and len(self._peers) >= MAX_LINK_LABELS:
                continue
            self._peers.add(sample.peer)
            self.link_transfer.labels(peer=sample.peer).observe(sample.transfer_ms / 1000.0)
            self.link_bytes.labels(peer=sample.peer).observe(sample.num_bytes)

    def observe_request(
        self,
        status: int | str,
        finish_reason: str | None,
        prompt_tokens: int = 0,
        timer: RequestTimer | None = None,
    ) -> None:
        """Record one finished request: its counts, and TTFT / TPS / duration from `timer`."""
        self.requests.labels(status=str(status), finish_reason=finish_reason or "none").inc()
        if prompt_tokens > 0:
            self.prompt_tokens.inc(prompt_tokens)
        if timer is None:
            return
        if timer.completion_tokens > 0:
            self.generation_tokens.inc(timer.completion_tokens)
            self.tps.observe(timer.tps)
        ttft = timer.ttft_s
        if ttft is not None:
            self.ttft.observe(ttft)
        self.duration.observe(timer.duration_s)

    def set_queue(self, running: int, waiting: int) -> None:
        """Set the running and waiting gauges."""
        self.running.set(running)
        self.waiting.set(waiting)

    def render(self) -> tuple[bytes, str]:
        """The text exposition of this registry and its content type, for `GET /metrics`."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
