"""The scheduler's traces of recent requests (`GET /v1/traces/{request_id}`, operator only).

Every attempt of a request (one per pipeline it ran on: a failed-over request has several) is
recorded from what its head sent: the final chunk's `metrics` hold the stages in pipeline order
with their layer ranges, queue and compute times, and the hops' transfer times and bytes
(parallax/node/tracing.py measures them). A bounded ring keeps the latest requests.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any

from parallax.node.tracing import hop_list

MAX_TRACES = 1000
STAGE_KEYS = ("node_id", "layers", "compute_ms", "queue_ms", "steps", "ms_per_token")


def attempt_trace(rid: str, node_ids: list[str], final: dict[str, Any] | None,
                  failure: Any = None) -> dict[str, Any]:
    """One attempt of a request: `rid` on the pipeline `node_ids`, from its final chunk (or
    error chunk; None when its head said nothing) and how it failed (replay.Failure or None)."""
    metrics = final.get("metrics") if isinstance(final, dict) else None
    metrics = metrics if isinstance(metrics, dict) else {}
    stages = [{k: s.get(k) for k in STAGE_KEYS} for s in metrics.get("stages") or []
              if isinstance(s, dict)]
    out: dict[str, Any] = {
        "rid": rid,
        "pipeline": list(node_ids),
        "outcome": "ok" if failure is None else getattr(failure, "kind", "error"),
        "stages": stages,
        "hops": hop_list(metrics),
        "slowest_stage": metrics.get("slowest_stage"),
    }
    for key in ("ttft_ms", "tps", "duration_ms"):
        if key in metrics:
            out[key] = metrics[key]
    if failure is not None:
        out["error"] = getattr(failure, "message", str(failure))
    return out


class TraceStore:
    """The full traces of the latest MAX_TRACES requests, by the id the client saw."""

    def __init__(self, capacity: int = MAX_TRACES) -> None:
        self.capacity = capacity
        self.traces: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.stage_ms: dict[str, float] = {}  # node id -> ms/token in its latest trace

    def add(self, request_id: str, attempts: list[dict[str, Any]], finish: str | None) -> None:
        """Record a request once it ended (evicting the oldest beyond the capacity)."""
        self.traces.pop(request_id, None)
        self.traces[request_id] = {"object": "trace", "id": request_id,
                                   "created": int(time.time()), "finish_reason": finish,
                                   "failovers": max(0, len(attempts) - 1),
                                   "attempts": attempts}
        while len(self.traces) > self.capacity:
            self.traces.popitem(last=False)
        for attempt in attempts:
            for stage in attempt["stages"]:
                if isinstance(stage.get("ms_per_token"), (int, float)) and stage.get("node_id"):
                    self.stage_ms[str(stage["node_id"])] = float(stage["ms_per_token"])

    def get(self, request_id: str) -> dict[str, Any] | None:
        return self.traces.get(request_id)

    def forget_node(self, node_id: str) -> None:
        self.stage_ms.pop(node_id, None)
