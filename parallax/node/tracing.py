"""Per-request traces: where a request's time goes on every stage and every hop.

Each stage measures with its own clock only, so no clock is ever synchronised:

- queue: from the moment a request's next input is there (the frontend's AddRequest, the
  previous stage's activations, the last stage's token back at the head) until the step that
  runs it starts;
- compute: the wall time of the steps that ran it (a batch's step counts for each of its
  requests), including the test-only delay of `PARALLAX_TEST_STEP_DELAY_MS`;
- hop: a message asks its receiver for a `LinkAck` (protocol/links.py); the sender's round trip less
  the receiver's reported time between taking the message and acking is the hop's transfer
  time. It includes any wait of the message at a receiver busy with a step.

A stage's figures for one request form a record of STAGE_RECORD_LEN floats (RECORD_FIELDS).
Activations carry the records of the stages before (`ActivationEntry.trace`); the last stage
appends its own to the request's final `TokenOutput.trace`, and the head refreshes its own
record there, so the head's frontend sees every stage in pipeline order and builds the summary
of the final chunk's `metrics` (`trace_summary`).
"""

from __future__ import annotations

import math
import os
import time
from collections import OrderedDict
from typing import Any

from parallax.protocol.ipc import LinkSample
from parallax.protocol.links import LinkAck

RECORD_FIELDS = ("start_layer", "end_layer", "queue_ms", "compute_ms", "steps", "hop_ms",
                 "hop_bytes", "hops")
STAGE_RECORD_LEN = len(RECORD_FIELDS)
_QUEUE, _COMPUTE, _STEPS, _HOP_MS, _HOP_BYTES, _HOPS = range(2, STAGE_RECORD_LEN)
MAX_TRACED_REQUESTS = 4096  # per stage: the oldest record goes first (requests never released)
MAX_UNACKED = 4096  # sends waiting for their ack
MAX_LINK_SAMPLES = 4096  # per StepOutputs (Prometheus link histograms of the frontend)
MAX_TRACE_STAGES = 64  # a trace longer than this many records is dropped as malformed
MAX_FIGURE = 1e12  # ms or bytes; anything larger (or negative, or not finite) is malformed
STEP_DELAY_ENV = "PARALLAX_TEST_STEP_DELAY_MS"


def step_delay_s() -> float:
    """Test-only: seconds this executor sleeps after every engine step that ran a request
    (`PARALLAX_TEST_STEP_DELAY_MS`, milliseconds; unset or 0: none), counted as the step's
    compute. Makes one node of a test cluster the slow one."""
    raw = os.environ.get(STEP_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STEP_DELAY_ENV}={raw!r} is not a number of milliseconds; unset it "
                         "or give e.g. 50") from None
    if not 0 <= value <= 60_000:
        raise ValueError(f"{STEP_DELAY_ENV}={raw!r} must be from 0 to 60000 milliseconds")
    return value / 1000.0


def now_ms() -> float:
    return time.perf_counter() * 1000.0


class StageTracer:
    """One executor's trace records, keyed by request id (bounded)."""

    def __init__(self, start_layer: int, end_layer: int) -> None:
        self.layers = (float(start_layer), float(end_layer))
        self.records: OrderedDict[str, list[float]] = OrderedDict()
        self.upstream: dict[str, list[float]] = {}  # the earlier stages' records, as received
        self.ready_at: dict[str, float] = {}  # rid -> when its next input arrived (ms)
        self.unacked: OrderedDict[int, tuple[float, str, list[tuple[str, int]]]] = OrderedDict()
        self.link_samples: list[LinkSample] = []
        self._next_send_id = 1

    def _record(self, rid: str) -> list[float]:
        record = self.records.get(rid)
        if record is None:
            if len(self.records) >= MAX_TRACED_REQUESTS:
                self.forget(next(iter(self.records)))
            record = self.records[rid] = [*self.layers] + [0.0] * (STAGE_RECORD_LEN - 2)
        return record

    def ready(self, rid: str) -> None:
        """The request's next input is here (its queue time starts, unless it already has)."""
        self._record(rid)
        self.ready_at.setdefault(rid, now_ms())

    def set_upstream(self, rid: str, trace: list[float]) -> None:
        self.upstream[rid] = list(trace)

    def on_step(self, started_ms: float, duration_ms: float, rids: list[str]) -> None:
        """A step that started at `started_ms` ran `rids` for `duration_ms`."""
        for rid in dict.fromkeys(rids):
            record = self._record(rid)
            record[_QUEUE] += max(0.0, started_ms - self.ready_at.pop(rid, started_ms))
            record[_COMPUTE] += duration_ms
            record[_STEPS] += 1

    def own(self, rid: str) -> list[float]:
        """This stage's record of `rid` (zeros if it has none)."""
        record = self.records.get(rid)
        return list(record) if record is not None else [*self.layers] + [0.0] * (
            STAGE_RECORD_LEN - 2)

    def trace_of(self, rid: str) -> list[float]:
        """The earlier stages' records followed by this stage's own."""
        return [*self.upstream.get(rid, ()), *self.own(rid)]

    def forget(self, rid: str) -> None:
        self.records.pop(rid, None)
        self.upstream.pop(rid, None)
        self.ready_at.pop(rid, None)

    # ---- hops ------------------------------------------------------------------------------

    def next_send_id(self) -> int:
        send_id = self._next_send_id
        self._next_send_id += 1
        return send_id

    def on_send(self, peer: str, items: list[tuple[str, int]], send_id: int | None = None) -> int:
        """A message to `peer` holding (rid, bytes) items is going out: its send id (a new one
        unless given, from `next_send_id`)."""
        send_id = self.next_send_id() if send_id is None else send_id
        if len(self.unacked) >= MAX_UNACKED:
            self.unacked.popitem(last=False)  # its ack never came (peer gone)
        self.unacked[send_id] = (now_ms(), peer, items)
        return send_id

    def on_ack(self, ack: LinkAck) -> None:
        sent = self.unacked.pop(ack.send_id, None)
        if sent is None:
            return
        sent_at, peer, items = sent
        transfer = max(0.0, now_ms() - sent_at - ack.held_ms)
        for rid, num_bytes in items:
            record = self.records.get(rid)
            if record is not None:
                record[_HOP_MS] += transfer
                record[_HOP_BYTES] += num_bytes
                record[_HOPS] += 1
        if len(self.link_samples) < MAX_LINK_SAMPLES:
            self.link_samples.append(LinkSample(peer, round(transfer, 3),
                                                sum(b for _, b in items)))

    def take_link_samples(self) -> list[LinkSample]:
        samples, self.link_samples = self.link_samples, []
        return samples


def trace_problem(trace: list[float]) -> str | None:
    """Why a received trace must be dropped (with its message), or None."""
    if len(trace) % STAGE_RECORD_LEN or len(trace) > STAGE_RECORD_LEN * MAX_TRACE_STAGES:
        return f"a trace of {len(trace)} figures"
    if not all(math.isfinite(v) and 0 <= v <= MAX_FIGURE for v in trace):
        return "a trace figure that is negative, huge or not finite"
    return None


def ack_problem(ack: LinkAck) -> str | None:
    if not 0 < ack.send_id < 2**62:
        return f"ack of send id {ack.send_id}"
    if not (math.isfinite(ack.held_ms) and 0 <= ack.held_ms <= MAX_FIGURE):
        return f"ack holding {ack.held_ms!r} ms"
    return None


# ---- the summary (head frontend) and the full trace (scheduler) -------------------------------


def split_records(trace: list[float]) -> list[dict[str, float]]:
    """A flat trace -> one dict per stage (RECORD_FIELDS), in pipeline order."""
    usable = len(trace) - len(trace) % STAGE_RECORD_LEN
    return [dict(zip(RECORD_FIELDS, trace[i:i + STAGE_RECORD_LEN], strict=True))
            for i in range(0, usable, STAGE_RECORD_LEN)]


def trace_summary(trace: list[float], node_ids: list[str]) -> dict[str, Any]:
    """The final chunk's `metrics` part of a trace: `stages` (node_id, layers, compute_ms,
    queue_ms, steps, ms_per_token) in pipeline order, `hops_ms` / `hop_bytes` (hop i goes from
    stage i to the next one, the last hop back to the head) and `slowest_stage` (the index of
    the stage with the most compute per step). `node_ids` name the stages in order."""
    records = split_records(trace)
    if not records:
        return {}
    stages = []
    for i, r in enumerate(records):
        steps = int(r["steps"])
        stages.append({
            "node_id": node_ids[i] if i < len(node_ids) else f"stage-{i}",
            "layers": [int(r["start_layer"]), int(r["end_layer"])],
            "compute_ms": round(r["compute_ms"], 2),
            "queue_ms": round(r["queue_ms"], 2),
            "steps": steps,
            "ms_per_token": round(r["compute_ms"] / steps, 3) if steps else None,
        })
    out: dict[str, Any] = {"stages": stages}
    if len(records) > 1:
        out["hops_ms"] = [round(r["hop_ms"], 2) for r in records]
        out["hop_bytes"] = [int(r["hop_bytes"]) for r in records]
    out["slowest_stage"] = slowest_stage(stages)
    return out


def slowest_stage(stages: list[dict[str, Any]]) -> int | None:
    """Index of the stage with the highest ms_per_token (None when none ran a step)."""
    timed = [(s["ms_per_token"], i) for i, s in enumerate(stages)
             if isinstance(s.get("ms_per_token"), (int, float))]
    return max(timed)[1] if timed else None


def hop_list(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The hops of a final chunk's metrics as {from, to, ms, bytes}, named by node id."""
    stages = metrics.get("stages") or []
    hops_ms, hop_bytes = metrics.get("hops_ms") or [], metrics.get("hop_bytes") or []
    ids = [s.get("node_id") for s in stages if isinstance(s, dict)]
    hops = []
    for i, ms in enumerate(hops_ms):
        if not ids:
            break
        hops.append({"from": ids[i % len(ids)], "to": ids[(i + 1) % len(ids)], "ms": ms,
                     "bytes": hop_bytes[i] if i < len(hop_bytes) else None})
    return hops
