"""What one executor does as a stage of a multi-node pipeline, around its engine.

- head (first stage): requests come from the frontend; hidden states go to the next stage;
  tokens come back from the last stage and feed the next decode step.
- middle: hidden states in, hidden states out.
- last: hidden states in, sampled tokens out to the head.
Finishing, aborting and preemption free the request on every stage: a LinkRelease travels the
same chain as the activations, so it always arrives after them. A link that drops fails the
requests routed through it at once; the head tells its frontend, the others tell the head.

Prefix caching across stages. Each stage caches its own layers' KV, and evictions differ per
stage, so before a request whose prefix the head holds runs, the stages agree on where it
starts: the head sends a LinkPrefixQuery along the chain (token ids only); each stage pins the
longest prefix it still holds, at most what the stages before it hold, and the last (or the
first that holds nothing) answers the head with that length. Every stage then starts the
request there: the head recomputes its own layers only for the part of its hit that a later
stage lost (its KV of that part stays pinned), sends hidden states from there, and marks that
first chunk `reuses_prefix`. Why ask first rather than send optimistically and repair on a
miss: a repair would have the stage that missed wait for a gap-filling chunk while chunks after
the gap arrive, and in a pipeline of three or more the gap must run through stages that already
hold it (out-of-order input everywhere). Asking costs one small message round over the pipeline
only for requests with a cached prefix (it saves the prefill of that prefix on every stage), and
blocks pinned when asked stay valid until the request starts, so no eviction race exists. An
answer that never comes (a peer lost it) expires after PREFIX_QUERY_TIMEOUT_S: the head starts
from 0, which resets every later stage, so a request never hangs on it; a lost link fails it as
before (and the scheduler replays it).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import msgspec
import torch

from parallax.engine.engine import Engine, StepOutput
from parallax.node.links import PeerUnreachable, PipelineLinks
from parallax.node.tracing import STAGE_RECORD_LEN, StageTracer, now_ms
from parallax.protocol.common import ENGINE_ERROR, PEER_LOST, TokenOutput, encode
from parallax.protocol.ipc import AddRequest
from parallax.protocol.links import (
    ActivationEntry,
    LinkAck,
    LinkActivations,
    LinkPrefixAnswer,
    LinkPrefixQuery,
    LinkRelease,
    LinkTokens,
)

logger = logging.getLogger("parallax.stage")

# then the head runs the request from 0 (it never hangs on a query). A query waits for at most
# one step of each later stage; a loaded CPU stage's prefill step can take over 10 s, and an
# answer really lost is rare (a lost link fails the request at once), so this is generous.
PREFIX_QUERY_TIMEOUT_S = 30.0


class RouteRejected(ValueError):
    """The routing table names stages this node does not link to (the cluster changed)."""


@dataclass
class Route:
    """Where one request's data goes from this stage."""

    next_endpoint: str | None  # None on the last stage
    downstream_after_next: list[str]
    head_endpoint: str


def error_output(rid: str, message: str, kind: str = ENGINE_ERROR,
                 peer: str | None = None) -> TokenOutput:
    """A failed request's last output; `kind` is one of protocol.FAILURE_KINDS."""
    return TokenOutput(rid, finished=True, finish_reason="error", error=message, kind=kind,
                       peer=peer)


def token_output(o: StepOutput, tracer: StageTracer) -> TokenOutput:
    """The one place an engine's StepOutput of a sampling stage becomes the TokenOutput its
    frontend or head receives. A finished request carries its trace, then the tracer forgets
    it."""
    trace = []
    if o.finished:
        trace = tracer.trace_of(o.request_id)
        tracer.forget(o.request_id)
    return TokenOutput(o.request_id, o.token_id, o.finished, o.finish_reason, o.error,
                       ENGINE_ERROR if o.finish_reason == "error" else None,
                       logprob=o.logprob, top_logprobs=o.top_logprobs or [], trace=trace)


class StageRouter:
    """Routes one executor's engine outputs and peer messages. Returns frontend outputs."""

    def __init__(self, engine: Engine, links: PipelineLinks,
                 tracer: StageTracer | None = None) -> None:
        self.engine = engine
        self.links = links
        self.tracer = tracer or StageTracer(0, 0)
        self.routes: dict[str, Route] = {}  # rid -> where its data goes from this stage
        self.prefix_deadlines: dict[str, float] = {}  # head: rid -> when its query expires

    # ---- from the frontend (head only) -------------------------------------------------

    def add_request(self, message: AddRequest) -> None:
        """Register the route of a pipelined request, then admit it (ValueError passes up)."""
        unknown = [e for e in message.downstream if not self.links.security.allows(e)]
        if unknown:  # never dial an endpoint the scheduler did not list for this pipeline
            raise RouteRejected(f"the routing table names {unknown[0][:80]!r}, which is not "
                                "in this node's pipeline (the cluster is rebalancing); retry")
        self.routes[message.rid] = Route(message.downstream[0], list(message.downstream[1:]),
                                         self.links.own_endpoint)
        try:
            self.engine.add_request(message.rid, list(message.prompt_token_ids),
                                    message.sampling_params, message.num_resumed_tokens)
        except (ValueError, RuntimeError):
            self.routes.pop(message.rid, None)
            raise

    def abort(self, rids: list[str]) -> None:
        for rid in rids:
            self.engine.abort(rid)
            self.tracer.forget(rid)
        self._release(rids)

    # ---- from peers --------------------------------------------------------------------

    def on_message(self, message, hidden: torch.Tensor | None) -> list[TokenOutput]:
        taken_ms = now_ms()
        if isinstance(message, LinkAck):
            self.tracer.on_ack(message)
            return []
        if isinstance(message, (LinkActivations, LinkTokens)) and message.send_id:
            self._ack(message, taken_ms)
        if isinstance(message, LinkActivations):
            self._on_activations(message, hidden)
            return []
        if isinstance(message, LinkTokens):
            return self._on_tokens(message.outputs)
        if isinstance(message, LinkRelease):
            self.abort(message.rids)
        elif isinstance(message, LinkPrefixQuery):
            self._on_prefix_query(message)
        elif isinstance(message, LinkPrefixAnswer):
            if self.prefix_deadlines.pop(message.rid, None) is not None:
                self.engine.resume_prefix(message.rid, message.num_cached_tokens)
        return []

    def _on_prefix_query(self, message: LinkPrefixQuery) -> None:
        """Later stage: pin what this stage holds of the prefix; ask on, or answer the head."""
        downstream = list(message.downstream)
        route = Route(downstream[0] if downstream else None, downstream[1:],
                      message.head_endpoint)
        self.routes[message.rid] = route
        held = self.engine.reserve_prefix(message.rid, list(message.token_ids))
        if route.next_endpoint is not None and held > 0:
            try:
                self.links.send_message(route.next_endpoint, LinkPrefixQuery(
                    message.rid, list(message.token_ids[:held]), route.downstream_after_next,
                    message.head_endpoint))
                return
            except PeerUnreachable as exc:  # _fail reports it to the head (it cannot run)
                self._fail([message.rid], str(exc), PEER_LOST, route.next_endpoint)
                return
        try:
            self.links.send_message(message.head_endpoint,
                                    LinkPrefixAnswer(message.rid, held))
        except PeerUnreachable:
            logger.warning("the head %s is unreachable; dropping a prefix answer",
                           message.head_endpoint)

    def _on_activations(self, message: LinkActivations, hidden: torch.Tensor) -> None:
        offset = 0
        for entry in message.entries:
            rows = hidden[offset: offset + len(entry.token_ids)]
            offset += len(entry.token_ids)
            starts = entry.start_position == 0 or entry.reuses_prefix
            if entry.start_position == 0:  # (re)start: drop whatever stale state we hold
                self.engine.abort(entry.rid)
            if starts:
                next_endpoint = entry.downstream[0] if entry.downstream else None
                self.routes[entry.rid] = Route(next_endpoint, list(entry.downstream[1:]),
                                               entry.head_endpoint)
            route = self.routes.get(entry.rid)
            if route is not None:
                self.tracer.ready(entry.rid)
                self.tracer.set_upstream(entry.rid, list(entry.trace))
            if route is None:  # released meanwhile, or state lost: tell the head
                if entry.head_endpoint:
                    self._to_head(entry.head_endpoint, [error_output(
                        entry.rid, "a later stage has no state for this request", PEER_LOST,
                        self.links.own_endpoint)])
                continue
            try:
                self.engine.add_hidden(
                    entry.rid, list(entry.token_ids), entry.start_position, rows,
                    entry.sampling_params, entry.num_prompt_tokens if starts else None,
                    entry.due)
            except (ValueError, RuntimeError) as exc:
                self.engine.abort(entry.rid)
                self._to_head(route.head_endpoint, [error_output(entry.rid, str(exc))])
                self._release([entry.rid])

    def _on_tokens(self, outputs: list[TokenOutput]) -> list[TokenOutput]:
        """Head: tokens sampled by the last stage."""
        finished = []
        outputs = [self._head_trace(output) for output in outputs]
        for output in outputs:
            if output.finish_reason == "error":
                self.engine.abort(output.rid)
            elif output.token_id is not None:
                self.engine.append_token(output.rid, output.token_id, output.finished,
                                         output.finish_reason)
            if output.finished:
                finished.append(output.rid)
                self.tracer.forget(output.rid)
            else:
                self.tracer.ready(output.rid)  # the next decode step's input is here
        self._release(finished)
        return outputs

    def _head_trace(self, output: TokenOutput) -> TokenOutput:
        """The head's own record, as it stands now, replaces the one it sent down."""
        if not output.trace:
            return output
        return msgspec.structs.replace(
            output, trace=self.tracer.own(output.rid) + list(output.trace[STAGE_RECORD_LEN:]))

    def _ack(self, message: LinkActivations | LinkTokens, taken_ms: float) -> None:
        """Answer a message that asked for it at once (its sender times the hop)."""
        if not self.links.allows(message.sender) or message.sender == self.links.own_endpoint:
            return
        try:
            self.links.send_message(message.sender,
                                    LinkAck(message.send_id, round(now_ms() - taken_ms, 3)))
        except PeerUnreachable:
            pass  # the sender is gone: nobody waits for this hop's time

    # ---- after a step ------------------------------------------------------------------

    def after_step(self, outputs: list[StepOutput]) -> list[TokenOutput]:
        """Send hidden states on / tokens back; return what the local frontend must see."""
        for_frontend: list[TokenOutput] = []
        preempted = self.engine.take_preempted()
        if preempted:
            self._release(preempted, keep_routes=True)
        for_frontend.extend(self._send_prefix_queries())
        if self.engine.is_last:
            by_head: dict[str, list[TokenOutput]] = defaultdict(list)
            for o in outputs:
                route = self.routes.get(o.request_id)
                output = token_output(o, self.tracer)
                if o.finished:
                    self.routes.pop(o.request_id, None)
                if route is None or route.head_endpoint == self.links.own_endpoint:
                    for_frontend.append(output)
                else:
                    by_head[route.head_endpoint].append(output)
            for head, batch in by_head.items():
                self._to_head(head, batch)
            return for_frontend
        by_next: dict[str, list[tuple[StepOutput, Route]]] = defaultdict(list)
        for o in outputs:
            route = self.routes.get(o.request_id)
            if o.hidden is None:  # an error output of this stage (e.g. out of KV blocks)
                for_frontend.extend(self._fail([o.request_id], o.error or "stage failed"))
            elif route is not None and route.next_endpoint is not None:
                by_next[route.next_endpoint].append((o, route))
        for endpoint, items in by_next.items():
            for_frontend.extend(self._send_activations(endpoint, items))
        return for_frontend

    def _send_prefix_queries(self) -> list[TokenOutput]:
        """Head: ask the later stages how much of each newly admitted cached prefix they hold."""
        failed = []
        deadline = time.monotonic() + PREFIX_QUERY_TIMEOUT_S
        for query in self.engine.take_prefix_queries():
            route = self.routes.get(query.request_id)
            if route is None or route.next_endpoint is None:
                self.engine.resume_prefix(query.request_id, 0)
                continue
            try:
                self.links.send_message(route.next_endpoint, LinkPrefixQuery(
                    query.request_id, query.token_ids, route.downstream_after_next,
                    route.head_endpoint))
            except PeerUnreachable as exc:
                failed.extend(self._fail([query.request_id], str(exc), PEER_LOST,
                                         route.next_endpoint))
                continue
            self.prefix_deadlines[query.request_id] = deadline
        return failed

    def _expire_prefix_queries(self) -> None:
        """Head: a query unanswered in time runs its request from 0 (which resets every later
        stage), so a lost message never leaves a request waiting."""
        now = time.monotonic()
        for rid, deadline in list(self.prefix_deadlines.items()):
            if not self.engine.has_request(rid):
                del self.prefix_deadlines[rid]
            elif now >= deadline:
                del self.prefix_deadlines[rid]
                logger.warning("no prefix answer for %s in %.0f s; running it from the start",
                               rid, PREFIX_QUERY_TIMEOUT_S)
                self.engine.resume_prefix(rid, 0)

    def _send_activations(self, endpoint: str, items) -> list[TokenOutput]:
        entries = []
        for o, route in items:
            first = o.first
            entries.append(ActivationEntry(
                o.request_id, list(o.token_ids), o.start_position,
                o.sampling_params, o.num_prompt_tokens,  # set on a first chunk only
                route.downstream_after_next if first else [],
                route.head_endpoint, o.due, self.tracer.trace_of(o.request_id),
                reuses_prefix=first and o.start_position > 0))
        hidden = torch.cat([o.hidden for o, _ in items])
        row_bytes = hidden.shape[-1] * hidden.element_size()
        send_id = self.tracer.on_send(endpoint, [(o.request_id, len(o.token_ids) * row_bytes)
                                                 for o, _ in items])
        try:
            self.links.send_activations(endpoint, entries, hidden, send_id)
        except PeerUnreachable as exc:
            return self._fail([o.request_id for o, _ in items], str(exc), PEER_LOST, endpoint)
        return []

    # ---- failures ----------------------------------------------------------------------

    def check_peers(self) -> list[TokenOutput]:
        """Fail every request routed through a link that dropped (or took nothing in time)."""
        self.links.flush()
        self._expire_prefix_queries()
        outputs = []
        for endpoint in self.links.disconnected_peers():
            rids = [rid for rid, r in self.routes.items() if r.next_endpoint == endpoint]
            if rids:
                logger.warning("lost the next stage %s; failing %d requests", endpoint, len(rids))
                kind = self.links.down_kinds.get(endpoint, PEER_LOST)
                outputs.extend(self._fail(rids, f"lost the connection to the next stage "
                                                f"({endpoint})", kind, endpoint))
        return outputs

    def drop_orphans(self) -> list[TokenOutput]:
        """After the scheduler changed this pipeline's peers: drop the requests whose head is
        no longer a peer (nobody will ever feed or read them; they only hold KV and running
        slots), and fail those whose next stage is no longer one."""
        orphans, cut = [], []
        for rid, route in self.routes.items():
            if not self.links.allows(route.head_endpoint):
                orphans.append(rid)
            elif route.next_endpoint is not None and not self.links.allows(route.next_endpoint):
                cut.append(rid)
        for rid in orphans:
            self.engine.abort(rid)
        if orphans:
            logger.warning("dropped %d requests whose head left the pipeline", len(orphans))
            self._release(orphans)
        return self._fail(cut, "the next stage left the pipeline", PEER_LOST) if cut else []

    def _fail(self, rids: list[str], message: str, kind: str = ENGINE_ERROR,
              peer: str | None = None) -> list[TokenOutput]:
        """Fail requests here; the head reports to its frontend, others to the head. The
        stages past a lost next stage are told to free the requests too (their KV would
        otherwise wait forever for activations that cannot come)."""
        for_frontend = []
        by_head: dict[str, list[TokenOutput]] = defaultdict(list)
        past_dead: dict[str, list[str]] = defaultdict(list)
        for rid in rids:
            self.engine.abort(rid)
            route = self.routes.pop(rid, None)
            if route is not None and peer is not None and route.next_endpoint == peer and \
                    route.downstream_after_next:
                past_dead[route.downstream_after_next[0]].append(rid)
            output = error_output(rid, message, kind, peer)
            if route is None or route.head_endpoint == self.links.own_endpoint:
                for_frontend.append(output)
            else:
                by_head[route.head_endpoint].append(output)
        for head, batch in by_head.items():
            self._to_head(head, batch)
        for endpoint, batch in past_dead.items():
            self._send_release(endpoint, batch)
        return for_frontend

    def _to_head(self, head_endpoint: str, outputs: list[TokenOutput]) -> None:
        send_id = self.tracer.next_send_id()
        data = encode(LinkTokens(outputs, send_id, self.links.own_endpoint))
        self.tracer.on_send(head_endpoint, [(o.rid, len(data) // len(outputs)) for o in outputs],
                            send_id)
        try:
            self.links.send(head_endpoint, [data])
        except PeerUnreachable:
            logger.warning("the head %s is unreachable; dropping %d outputs", head_endpoint,
                           len(outputs))

    def _release(self, rids: list[str], keep_routes: bool = False) -> None:
        """Tell the next stage to free these requests (it forwards along the chain)."""
        by_next: dict[str, list[str]] = defaultdict(list)
        for rid in rids:
            route = self.routes.get(rid) if keep_routes else self.routes.pop(rid, None)
            if route is not None and route.next_endpoint is not None:
                by_next[route.next_endpoint].append(rid)
        for endpoint, batch in by_next.items():
            self._send_release(endpoint, batch)

    def _send_release(self, endpoint: str, rids: list[str]) -> None:
        if not self.links.allows(endpoint):
            return
        try:
            self.links.send_message(endpoint, LinkRelease(rids))
        except PeerUnreachable:
            pass  # the peer is gone, and its KV with it
