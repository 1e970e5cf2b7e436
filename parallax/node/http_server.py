"""The node's HTTP server (the process beside its executor; the web UI is parallax/web): OpenAI
chat API, tokenization, streaming text, health and metrics.

`NodeHttpServer` turns a chat request into prompt token ids (chat template with
`chat_template_kwargs`, rendered and tokenized in a worker thread so that no prompt can stall the
event loop that also answers /health and sends the cluster heartbeats), hands them to the
executor through `ExecutorClient`, and turns the token ids coming back into text: incremental
detokenization, stop strings (never leaked, even split across tokens), the reasoning / answer
split of thinking models, then SSE chunks or one `chat.completion`. Admission is bounded
(running + waiting); beyond it the answer is 429. A client that goes away (streaming or not)
aborts its request in the executor. `/v1/completions` and `/v1/responses` are the same path with
their request translated in and their answer translated out (parallax/serving/adapters.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from parallax.config import ServeConfig
from parallax.engine.sampling_params import SamplingParams, check_prompt_length
from parallax.node.executor_client import ExecutorClient, ExecutorLost, NotReadyError
from parallax.node.probe import PROBE_BODY
from parallax.node.tracing import trace_summary
from parallax.protocol.common import ENGINE_ERROR
from parallax.protocol.control import RoutingEntry
from parallax.serving import sse
from parallax.serving.adapters import OutputAdapter, adapt_response
from parallax.serving.completions import (
    TextCompletionRequest,
    completion_adapter,
    parse_completion_request,
)
from parallax.serving.detokenizer import IncrementalDetokenizer
from parallax.serving.errors import (
    APIError,
    error_body,
    install_error_handlers,
    require_join_token,
)
from parallax.serving.internal_leg import KEY as INTERNAL_KEY
from parallax.serving.internal_leg import InternalRequest, parse_internal
from parallax.serving.metrics import RequestTimer, ServingMetrics
from parallax.serving.openai_schemas import (
    ChatCompletionRequest,
    check_model_name,
    chunk,
    completion,
    logprobs_entry,
    models_list,
    new_chat_id,
    parse_chat_request,
    parse_json_body,
    to_sampling_params,
    usage_dict,
)
from parallax.serving.reasoning import (
    HARMONY_MODEL_TYPES,
    THINK_MODEL_TYPES,
    HarmonyParser,
    ThinkParser,
    make_reasoning_parser,
)
from parallax.serving.responses_api import parse_responses_request, responses_adapter
from parallax.serving.security import install_security, read_body_capped
from parallax.serving.sse import DONE, encode_event
from parallax.serving.stop import StopStringMatcher
from parallax.serving.structured import check_grammar, grammar_vocab_json
from parallax.serving.text_state import TextState
from parallax.serving.tool_calls import (
    HarmonyToolParser,
    ToolCall,
    ToolCallStage,
    add_system_text,
    call_deltas,
    choice_instruction,
    hermes_history,
    hermes_system_prompt,
    make_tool_parser,
    tool_format,
)
from parallax.serving.tool_grammar import GrammarContext, answer_grammar, tool_call_grammar

logger = logging.getLogger("parallax.frontend")

STATUS_CLIENT_GONE = 499
# Threads that render chat templates and tokenize prompts; more renders wait for one.
RENDER_THREADS = 4
# The tool that tells whether a chat template renders `tools` (rendered with and without it).
PROBE_TOOL = {"type": "function", "function": {
    "name": "parallax_probe_tool", "description": "Probe.",
    "parameters": {"type": "object", "properties": {}}}}


@dataclass
class ChatJob:
    """One chat request between admission and its last byte."""

    rid: str
    model: str
    created: int
    prompt_ids: list[int]
    queue: asyncio.Queue
    text: TextState
    timer: RequestTimer = field(default_factory=RequestTimer)
    internal: bool = False  # the scheduler's leg: chunks carry token ids, errors their kind
    num_completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500
    error_kind: str = ENGINE_ERROR  # protocol.FAILURE_KINDS
    error_peer: str | None = None  # the lost activation endpoint, when one was
    final_delta: tuple[str, str] = ("", "")  # text released when the request ended
    done: bool = False  # the executor side is over (finished, failed or aborted)
    ended: bool = False  # metrics recorded, watcher stopped
    watcher: asyncio.Task | None = None
    tools: ToolCallStage | None = None  # the request's tool-call stage (tools and not "none")
    reasoning_content: list[str] = field(default_factory=list)  # non-streaming: collected
    content: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: bool = False  # the request asked for logprobs
    # one `logprobs.content` entry per generated token; a stream sends them from `logprobs_sent`
    # on with the next chunk (the one carrying their text, or the final one)
    logprob_entries: list[dict[str, Any]] = field(default_factory=list)
    logprobs_sent: int = 0
    stage_ids: list[str] = field(default_factory=list)  # node ids of its pipeline, head first
    trace: list[float] = field(default_factory=list)  # the executors' trace (node/tracing.py)

    def metrics(self) -> dict[str, Any]:
        """The final chunk's `metrics`: times, and the trace summary of its stages."""
        return {**self.timer.metrics_dict(), **trace_summary(self.trace, self.stage_ids)}

    def take_logprobs(self) -> list[dict[str, Any]] | None:
        """Stream: the entries not sent yet, for the chunk being built (None: none, or the
        request did not ask)."""
        if not self.logprobs or self.logprobs_sent == len(self.logprob_entries):
            return None
        entries = self.logprob_entries[self.logprobs_sent:]
        self.logprobs_sent = len(self.logprob_entries)
        return entries

    def finish(self) -> str:
        """finish_reason of the answer: `tool_calls` when the model called a tool and stopped."""
        reason = self.finish_reason or "stop"
        if reason == "stop" and self.tools is not None and self.tools.num_calls:
            return "tool_calls"
        return reason

    def usage(self) -> dict[str, int]:
        return usage_dict(len(self.prompt_ids), self.num_completion_tokens)


class NodeHttpServer:
    """HTTP side of a node. `tokenizer` may be injected (tests); else it is loaded at start."""

    def __init__(self, config: ServeConfig, client: ExecutorClient, model_name: str,
                 tokenizer: Any = None) -> None:
        self.config = config
        self.client = client
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.metrics = ServingMetrics()
        if client is not None:  # None only in tests that render prompts without an executor
            client.on_step = lambda step: self.metrics.observe_step(step.stats, step.links)
        self.created = int(time.time())
        self.node_id: str | None = None  # set when this node is part of a cluster
        self.join_token: str | None = None  # the cluster's: required from whoever sends chats
        self._tokenizer_task: asyncio.Task | None = None
        self._num_rendering = 0  # admitted requests whose prompt is being rendered
        self._render_pool = concurrent.futures.ThreadPoolExecutor(
            RENDER_THREADS, thread_name_prefix="parallax-render")
        # templates render side by side; fast tokenizers refuse concurrent encodes (Rust borrow
        # checks: "Already borrowed"), so encoding takes turns
        self._encode_lock = threading.Lock()
        self._renders_tools: bool | None = None  # the chat template renders `tools`
        self._added: dict[str, int] | None = None  # the tokenizer's added tokens

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self, tokenizer_path: str | None = None) -> None:
        """Start the executor; load the tokenizer meanwhile when its path is known already."""
        await self.client.start()
        if self.tokenizer is None and tokenizer_path is not None:
            self._tokenizer_task = asyncio.create_task(self._load_tokenizer(tokenizer_path))

    async def wait_ready(self) -> None:
        """Wait for the executor and the tokenizer; raise NotReadyError if start-up failed."""
        info = await self.client.wait_ready()
        if self.tokenizer is None:
            if self._tokenizer_task is None:
                self._tokenizer_task = asyncio.create_task(
                    self._load_tokenizer(info.tokenizer_path))
            await self._tokenizer_task

    async def _load_tokenizer(self, path: str) -> None:
        from parallax.models.loader import load_tokenizer

        tokenizer = await asyncio.to_thread(load_tokenizer, path)
        vocab = await asyncio.to_thread(grammar_vocab_json, tokenizer)
        if vocab is not None:  # the executor constrains decoding with it (response_format)
            self.client.set_grammar_vocab(vocab)
        self.tokenizer = tokenizer  # ready from here on

    async def close(self) -> None:
        await self.client.close()
        self._render_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def ready(self) -> bool:
        return self.client.state == "ready" and self.tokenizer is not None

    def status(self) -> str:
        """ready | loading | error | stopped."""
        if self.client.state == "ready" and self.tokenizer is None:
            return "loading"
        return self.client.state

    # ---- request handling ------------------------------------------------------------

    async def read_body(self, request: Request) -> bytes:
        """The request body, or 413 once it exceeds the limit (by header or while reading)."""
        return await read_body_capped(request, self.config.max_body_bytes)

    def _check_ready(self) -> None:
        if not self.ready:
            state = self.status()
            if state == "error":
                raise APIError(503, f"the model failed to start: {self.client.error}")
            raise APIError(503, "the model is loading; retry in a few seconds")

    def render_prompt(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """Chat template (with the request's kwargs) and token ids; a template error is a 400.

        Blocking (Jinja, tokenizer): the frontend runs it in its render threads. The kwargs are
        allow-listed scalars (`parse_chat_request`), so the template is always the operator's.
        """
        if isinstance(req, TextCompletionRequest):
            return self.tokenize_prompt(req.prompt)
        messages = req.template_messages()
        kwargs = dict(req.chat_template_kwargs)
        if req.uses_tools:
            tools = req.template_tools()
            extra = choice_instruction(req.tool_choice, req.tool_choice_name,
                                       req.parallel_tool_calls)
            if self.template_renders_tools():
                kwargs["tools"] = tools
            else:  # teach the Hermes format in the system prompt
                messages = hermes_history(messages)
                extra = hermes_system_prompt(tools) + (f"\n\n{extra}" if extra else "")
            messages = add_system_text(messages, extra)
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs)
            with self._encode_lock:
                ids = self.tokenizer.encode(text, add_special_tokens=False)
        except Exception as exc:  # jinja errors raised by templates, bad kwargs...
            raise APIError(400, f"the chat template rejected the request: {exc}") from None
        return text, list(ids)

    def tokenize_prompt(self, prompt: str | list[int]) -> tuple[str, list[int]]:
        """A `/v1/completions` prompt as is (no template; BOS as the tokenizer adds it), or its
        token ids checked against the vocabulary."""
        if isinstance(prompt, str):
            with self._encode_lock:
                return prompt, list(self.tokenizer.encode(prompt))
        vocab = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else 2**31 - 1
        if max(prompt) >= vocab:
            raise APIError(400, f"'prompt' holds token id {max(prompt)}, not a token id of this "
                                f"model (0..{vocab - 1})")
        return "", list(prompt)

    def template_renders_tools(self) -> bool:
        """Whether the chat template renders `tools` (checked once: with and without a tool)."""
        if self._renders_tools is None:
            probe = [{"role": "user", "content": "Hi"}]
            try:
                plain = self.tokenizer.apply_chat_template(probe, tokenize=False,
                                                           add_generation_prompt=True)
                with_tool = self.tokenizer.apply_chat_template(
                    probe, tools=[PROBE_TOOL], tokenize=False, add_generation_prompt=True)
                self._renders_tools = (with_tool != plain
                                       and "parallax_probe_tool" in with_tool)
            except Exception:  # a template that fails on tools does not render them
                self._renders_tools = False
        return self._renders_tools

    def _chat_template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None) or ""
        if isinstance(template, dict):
            return "\n".join(str(t) for t in template.values())
        return template if isinstance(template, str) else ""

    async def render_prompt_async(self, req: ChatCompletionRequest) -> tuple[str, list[int]]:
        """`render_prompt` in a render thread: the event loop keeps serving meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._render_pool, self.render_prompt, req)

    def _sampling_params(self, req: ChatCompletionRequest, num_prompt: int,
                         thinking: str = "none") -> SamplingParams:
        info = self.client.info
        assert info is not None
        try:
            check_prompt_length(num_prompt, info.max_model_len)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        capacity = info.num_total_blocks * info.block_size
        if num_prompt + 1 > capacity:
            raise APIError(400, f"the prompt has {num_prompt} tokens but this node's KV cache "
                                f"holds {capacity}; restart it with a larger --kv-memory")
        room = min(info.max_model_len, capacity) - num_prompt
        eos: set[int] = set() if req.ignore_eos else set(info.eos_token_ids)
        if not req.ignore_eos and getattr(self.tokenizer, "eos_token_id", None) is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        params = to_sampling_params(req, room, sorted(eos), self._grammar(req, thinking))
        if params.max_tokens > room:
            params = msgspec.structs.replace(params, max_tokens=room)
        return params

    def _grammar(self, req: ChatCompletionRequest, thinking: str = "none") -> str | None:
        """The grammar the answer is decoded under (None: free decoding): the tool calls in
        this model's format (forced, or lazily under `"auto"`), else `response_format`'s JSON;
        after the reasoning block `thinking` allows (see `_thinking_mode`)."""
        forced = req.forces_tool_call
        if not req.uses_tools and req.response_format.grammar is None:
            return None
        if self.client.grammar_vocab is None:
            if req.uses_tools and not forced and req.response_format.grammar is None:
                return None  # "auto" calls stay free where the tokenizer cannot constrain
            raise APIError(400, "this model's tokenizer cannot constrain decoding "
                                "('response_format' or a forced 'tool_choice'); remove them")
        fmt = self._tool_format()
        ctx = GrammarContext(self._added_tokens(), thinking)
        schema = req.response_format.answer_schema
        try:
            if req.uses_tools:
                grammar = tool_call_grammar(req.template_tools(), fmt, req.parallel_tool_calls,
                                            auto=not forced, ctx=ctx, answer_schema=schema)
                return check_grammar(grammar, "tools")
            assert schema is not None
            harmony = self.client.info.model_type in HARMONY_MODEL_TYPES and \
                thinking == "harmony"
            grammar = answer_grammar(schema, ctx, harmony)
        except (ValueError, TypeError) as exc:  # llguidance refused what the checks let by
            raise APIError(400, f"'tools' / 'response_format' cannot constrain the answer: "
                                f"{exc}") from None
        return req.response_format.grammar if grammar is None else check_grammar(
            grammar, "response_format")

    def _added_tokens(self) -> dict[str, int]:
        """The tokenizer's added tokens (markers a grammar may take as one token)."""
        if self._added is None:
            try:
                self._added = dict(self.tokenizer.get_added_vocab())
            except Exception:  # noqa: BLE001 - a tokenizer without them: markers are spelled
                self._added = {}
        return self._added

    @staticmethod
    def _thinking_mode(parser: Any, model_type: str, enable_thinking: bool,
                       prompt_text: str) -> str:
        """Where reasoning stands for the grammar (tool_grammar.GrammarContext.thinking)."""
        if isinstance(parser, HarmonyParser):
            return "none" if prompt_text.endswith("<|message|>") else "harmony"
        if isinstance(parser, ThinkParser):
            if parser.in_reasoning:
                return "open"
            if enable_thinking and model_type in THINK_MODEL_TYPES:
                return "optional"
        return "none"

    def _tool_format(self) -> str:
        info = self.client.info
        assert info is not None
        return tool_format(info.model_type, self._chat_template(), self.template_renders_tools())

    def _check_admission(self, rid: str, num_rendering: int) -> None:
        """400 for a running rid, 429 at capacity (renders in progress count as running)."""
        self._check_ready()
        if rid in self.client.requests:
            raise APIError(400, f"request id {rid!r} is already running; use a unique 'rid'")
        if len(self.client.requests) + num_rendering >= self.config.max_in_flight:
            raise APIError(429, f"the server is at capacity ({self.config.max_in_flight} "
                                "requests running or waiting); retry later")

    def parse_internal(self, body: Any) -> InternalRequest:
        """The scheduler's internal fields of a request body (400 when malformed)."""
        if not isinstance(body, dict) or INTERNAL_KEY not in body:
            return InternalRequest()
        self._check_ready()
        info = self.client.info
        assert info is not None
        vocab = len(self.tokenizer) if hasattr(self.tokenizer, "__len__") else 2**31 - 1
        return parse_internal(body, vocab, info.max_model_len)

    async def admit(self, req: ChatCompletionRequest, timer: RequestTimer | None = None,
                    internal: InternalRequest | None = None) -> ChatJob:
        """Checks that need the model, render the prompt off the loop, hand it to the executor.

        The checks run again after the render, with no await between them and the submit, so
        the capacity and rid checks still hold when the request reaches the executor. A replay
        (`internal.resume_token_ids`) prefills prompt + those ids, counts them as generated and
        starts its text state after them.
        """
        internal = internal or InternalRequest()
        resume = list(internal.resume_token_ids)
        rid = req.rid or new_chat_id()
        self._check_admission(rid, self._num_rendering)
        self._num_rendering += 1
        try:
            prompt_text, prompt_ids = await self.render_prompt_async(req)
        finally:
            self._num_rendering -= 1
        self._check_admission(rid, self._num_rendering)
        downstream = self.downstream_endpoints(req.routing_table)  # the layers held now
        info = self.client.info
        assert info is not None
        harmony = info.model_type in HARMONY_MODEL_TYPES
        enable_thinking = req.chat_template_kwargs.get("enable_thinking", True) is not False
        parser = None if isinstance(req, TextCompletionRequest) else \
            make_reasoning_parser(info.model_type, prompt_text, enable_thinking)
        params = self._sampling_params(req, len(prompt_ids), self._thinking_mode(
            parser, info.model_type, enable_thinking, prompt_text))
        tools = None
        if req.uses_tools:
            fmt = self._tool_format()
            harmony_calls = None
            if fmt == "harmony" and isinstance(parser, HarmonyParser):
                parser = harmony_calls = HarmonyToolParser.from_parser(parser)
            tools = ToolCallStage(make_tool_parser(fmt, req.tools), harmony_calls,
                                  req.parallel_tool_calls)
        text = TextState(IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                                skip_special_tokens=not harmony),
                         StopStringMatcher(req.stop), parser)
        resumed_content = text.prime(resume)
        if tools is not None:  # the tool stage is primed too (its calls so far went out)
            tools.feed(resumed_content)
        done_at_once = _resumed_finish(resume, params, text.stopped, len(prompt_ids),
                                       min(info.max_model_len,
                                           info.num_total_blocks * info.block_size))
        if done_at_once is not None:  # the broken pipeline had produced everything already
            queue: asyncio.Queue = asyncio.Queue()
        else:
            try:
                queue = self.client.submit(rid, prompt_ids + resume, params, downstream,
                                           len(resume))
            except NotReadyError as exc:
                raise APIError(503, str(exc)) from None
        job = ChatJob(
            rid=rid, model=self.model_name, created=int(time.time()), prompt_ids=prompt_ids,
            queue=queue, text=text, timer=timer or RequestTimer(), internal=internal.internal,
            num_completion_tokens=len(resume), tools=tools, logprobs=req.logprobs,
            stage_ids=self.stage_ids(req.routing_table),
        )
        if done_at_once is not None:
            job.done, job.finish_reason = True, done_at_once
        return job

    def downstream_endpoints(self, routing_table: Any) -> list[str]:
        """Activation endpoints after this node for a request routed by the scheduler.

        The table must start with this node holding exactly its loaded layers and chain the
        stages to the last layer; otherwise the cluster changed meanwhile (503: retry).
        """
        info = self.client.info
        assert info is not None
        whole = info.start_layer == 0 and info.end_layer == info.num_layers
        if not routing_table:
            if not whole:
                raise APIError(503, f"this node holds layers [{info.start_layer}, "
                                    f"{info.end_layer}) only; send requests to the scheduler")
            return []
        try:
            entries = msgspec.convert(routing_table, list[RoutingEntry])
        except msgspec.ValidationError as exc:
            raise APIError(400, f"'routing_table' is malformed: {exc}") from None
        head = entries[0] if entries else None
        if (head is None or (self.node_id is not None and head.node_id != self.node_id)
                or (head.start_layer, head.end_layer) != (info.start_layer, info.end_layer)):
            raise APIError(503, "the routing table does not match this node's layers "
                                "(the cluster is rebalancing); retry")
        for previous, entry in zip(entries[:-1], entries[1:], strict=True):
            if entry.start_layer != previous.end_layer:
                raise APIError(400, "'routing_table' stages are not contiguous")
        if entries[-1].end_layer != info.num_layers:
            raise APIError(400, "'routing_table' does not reach the last layer")
        return [entry.activation_endpoint for entry in entries[1:]]

    def stage_ids(self, routing_table: Any) -> list[str]:
        """The node ids of a request's stages (validated by `downstream_endpoints`)."""
        if routing_table:
            return [str(entry.get("node_id", "")) for entry in routing_table
                    if isinstance(entry, dict)]
        return [self.node_id or "local"]

    async def deltas(self, job: ChatJob) -> AsyncIterator[tuple[str, str]]:
        """Yield (reasoning, content) text deltas until the request ends; sets finish fields
        and `job.final_delta`, the text held back until the end (none after a failure on the
        internal leg: the request goes on elsewhere, from the ids sent so far)."""
        while not job.done:
            item = await job.queue.get()
            if isinstance(item, ExecutorLost):
                job.done, job.finish_reason = True, "error"
                job.error, job.error_status, job.error_kind = item.message, 503, item.kind
                break
            if getattr(item, "trace", None):
                job.trace = list(item.trace)
            if item.token_id is not None:
                job.num_completion_tokens += 1
                job.timer.mark_tokens(1)
                if job.logprobs and item.logprob is not None:
                    job.logprob_entries.append(logprobs_entry(
                        self.token_text, item.token_id, item.logprob, item.top_logprobs))
                reasoning, content = job.text.feed(item.token_id)
                if reasoning or content:
                    yield reasoning, content
                if job.text.stopped:
                    job.done, job.finish_reason = True, "stop"
                    self.client.abort(job.rid)
                    break
            if item.finished:
                job.done, job.finish_reason = True, item.finish_reason or "stop"
                job.error = item.error
                job.error_kind, job.error_peer = item.kind or ENGINE_ERROR, item.peer
                if job.finish_reason == "error" and not job.error:
                    job.error = "the request failed in the executor"
                break
        if not (job.internal and job.finish_reason == "error"):
            job.final_delta = job.text.finish()

    def token_text(self, token_id: int) -> str:
        """The text of one token id alone (logprobs entries)."""
        return self.tokenizer.decode([int(token_id)])

    def _internal_error(self, job: ChatJob, exc: Exception) -> None:
        logger.exception("request %s failed in the frontend", job.rid, exc_info=exc)
        job.finish_reason, job.error_status, job.error_kind = "error", 500, ENGINE_ERROR
        job.final_delta = ("", "")
        job.error = f"internal error while producing the answer: {type(exc).__name__}: {exc}"

    def end(self, job: ChatJob, status: int | None = None) -> None:
        """Abort if still running, stop the watcher, record metrics (idempotent)."""
        if job.ended:
            return
        job.ended = True
        if not job.done:
            job.done, job.finish_reason = True, job.finish_reason or "abort"
            self.client.abort(job.rid)
        if job.watcher is not None:
            job.watcher.cancel()
        job.timer.finish()
        if status is None:
            status = {"abort": STATUS_CLIENT_GONE, "error": job.error_status}.get(
                job.finish_reason or "", 200)
        self.metrics.observe_request(status, job.finish_reason, len(job.prompt_ids), job.timer)

    async def _watch_disconnect(self, request: Request, job: ChatJob) -> None:
        """Abort the job as soon as the client goes away."""
        while not job.done:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not job.done and self.client.abort(job.rid):
                    logger.info("client of %s went away; aborted", job.rid)
                return

    def watch(self, request: Request, job: ChatJob) -> None:
        job.watcher = asyncio.create_task(self._watch_disconnect(request, job))

    def _chunk(self, job: ChatJob, delta: dict[str, Any], finish: str | None = None,
               metrics: dict[str, Any] | None = None) -> bytes:
        body = chunk(job.rid, job.model, job.created, delta, finish, job.usage(), metrics,
                     job.take_logprobs())
        if job.internal:  # the ids this chunk's text came from (internal_leg.py)
            extra: dict[str, Any] = {"token_ids": job.text.take_ids()}
            if finish is not None:
                extra["reasoning"] = job.text.parser is not None
            body[INTERNAL_KEY] = extra
        return encode_event(body)

    async def stream(self, job: ChatJob) -> AsyncIterator[bytes]:
        """SSE: role chunk, delta chunks, final chunk (finish_reason, metrics), [error,] [DONE].

        On the internal leg the final chunk carries the last delta itself (internal_leg.py)."""
        try:
            yield encode_event(chunk(job.rid, job.model, job.created,
                                     {"role": "assistant", "content": ""}, None, job.usage()))
            try:
                async for reasoning, content in self.deltas(job):
                    for delta in self.answer_deltas(job, reasoning, content):
                        yield self._chunk(job, delta)
            except Exception as exc:  # a bug in text handling fails this request only
                self._internal_error(job, exc)
            job.timer.finish()
            try:
                final = self.answer_deltas(job, *job.final_delta, final=True)
            except Exception as exc:
                self._internal_error(job, exc)
                final = []
            last: dict[str, Any] = {}
            if job.internal:  # one delta, in the final chunk (internal_leg.py)
                last = final[0] if final else {}
            else:
                for delta in final:
                    yield self._chunk(job, delta)
            yield self._chunk(job, last, job.finish(), job.metrics())
            if job.finish_reason == "error":
                error = error_body(job.error_status, job.error or "error")
                if job.internal:
                    error[INTERNAL_KEY] = {"kind": job.error_kind, "peer": job.error_peer}
                yield encode_event(error)
            yield DONE
        finally:
            self.end(job)

    async def complete(self, job: ChatJob) -> JSONResponse:
        """Non-streaming: collect everything, answer one chat.completion (or the error)."""
        try:
            async for r, c in self.deltas(job):
                self._collect(job, r, c)
            self._collect(job, *job.final_delta, final=True)
        except Exception as exc:  # a bug in text handling fails this request only
            self._internal_error(job, exc)
        finally:
            self.end(job)
        if job.finish_reason == "error":
            raise APIError(job.error_status, job.error or "the request failed")
        body = completion(job.rid, job.model, job.created, "".join(job.content),
                          "".join(job.reasoning_content) if job.text.parser is not None
                          else None, job.finish(), job.usage(), job.metrics(),
                          [call.to_dict() for call in job.tool_calls],
                          job.logprob_entries if job.logprobs else None)
        return JSONResponse(body)

    def _collect(self, job: ChatJob, reasoning: str, content: str, final: bool = False) -> None:
        """Non-streaming: add one (reasoning, content) delta to the answer being built."""
        job.reasoning_content.append(reasoning)
        if job.tools is None:
            job.content.append(content)
            return
        for piece in job.tools.feed(content, final):
            if isinstance(piece, ToolCall):
                job.tool_calls.append(piece)
            else:
                job.content.append(piece)

    def answer_deltas(self, job: ChatJob, reasoning: str, content: str,
                      final: bool = False) -> list[dict[str, Any]]:
        """The chunk deltas of one (reasoning, content) delta: text, then each call's id and
        name, then its arguments. On the internal leg, one delta holding everything."""
        if job.tools is None:
            delta = _delta(reasoning, content)
            return [delta] if delta else []
        deltas: list[dict[str, Any]] = []
        text = _delta(reasoning, "")
        for piece in job.tools.feed(content, final):
            if isinstance(piece, str):
                text["content"] = text.get("content", "") + piece
                continue
            if text:
                deltas.append(text)
                text = {}
            deltas.extend({"tool_calls": [entry]}
                          for entry in call_deltas(piece, merged=job.internal))
        if text:
            deltas.append(text)
        if job.internal and len(deltas) > 1:
            merged: dict[str, Any] = {}
            for delta in deltas:
                for key, value in delta.items():
                    merged[key] = merged.get(key, "" if isinstance(value, str) else []) + value
            deltas = [merged]
        return deltas

    def health(self) -> dict[str, Any]:
        stats = self.client.stats
        return {
            "status": self.status(),
            "model": self.model_name,
            "num_running": stats.num_running,
            "num_waiting": stats.num_waiting,
            "num_requests": len(self.client.requests),
            "num_free_blocks": stats.num_free_blocks,
            "num_total_blocks": stats.num_total_blocks,
            "executor_pid": self.client.pid,
            "executor_restarts": self.client.num_restarts,
            # tokens this node's executors computed in prefill / in decode steps
            "num_prefill_tokens": self.client.num_prefill_tokens,
            "num_decode_tokens": self.client.num_decode_tokens,
            # prefix caching on this node's stage: prompt tokens its cache held, tokens a head
            # ran again for a later stage that had lost them, hidden-state bytes it sent on
            "num_prefix_hit_tokens": self.client.total("num_prefix_hit_tokens"),
            "num_prefix_recomputed_tokens": self.client.total("num_prefix_recomputed_tokens"),
            "num_activation_bytes_sent": self.client.total("num_activation_bytes_sent"),
            "error": self.client.error,
            # packed GGUF weight type -> the kernel path it uses ({} for float weights)
            "kernels": dict(self.client.info.kernels) if self.client.info else {},
            # pure decode steps: "one native call per step (...)" or "torch modules (why)"
            "decode_step": self.client.info.decode_step if self.client.info else "",
        }


def _delta(reasoning: str, content: str) -> dict[str, str]:
    delta = {}
    if reasoning:
        delta["reasoning_content"] = reasoning
    if content:
        delta["content"] = content
    return delta


def _resumed_finish(resume: list[int], params: SamplingParams, stopped: bool,
                    num_prompt: int, room: int) -> str | None:
    """How a replayed request ends before generating anything (None: it goes on).

    The broken pipeline may have produced the last token without its end reaching us: the
    replayed ids already hit max_tokens, end in a stop / EOS token, or a stop string."""
    if not resume:
        return None
    if stopped:
        return "stop"
    last = resume[-1]
    if last in params.stop_token_ids and not params.ignore_eos:
        return "stop"
    if len(resume) >= params.max_tokens or num_prompt + len(resume) >= room:
        return "length"
    return None


def build_app(frontend: NodeHttpServer) -> FastAPI:
    """The FastAPI app of a node (or of `parallax serve`)."""
    app = FastAPI(title="Parallax node", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    async def serve(request: Request, parse: Callable[[Any], ChatCompletionRequest],
                    adapter: Callable[[Any, Any], OutputAdapter] | None = None,
                    internal_leg: bool = True) -> Response:
        """One request through the chat path; `parse` turns the body into a chat request,
        `adapter` translates the answer into another API's shape (not on the internal leg:
        the scheduler translates what it relays)."""
        timer = RequestTimer()
        try:
            # a node of a cluster with a join token serves only its scheduler (which sends it)
            require_join_token(request, frontend.join_token)
            body = await frontend.read_body(request)
            raw = parse_json_body(body)
            req = parse(raw)
            check_model_name(req.model, frontend.model_name)
            internal = frontend.parse_internal(raw) if internal_leg else None
            job = await frontend.admit(req, timer, internal)
        except APIError as exc:
            frontend.metrics.observe_request(exc.status, None)
            raise
        frontend.watch(request, job)
        if req.stream:
            response: Response = StreamingResponse(
                frontend.stream(job), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        else:
            response = await frontend.complete(job)
        if adapter is None or job.internal:
            return response
        return adapt_response(response, adapter(req, raw))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, parse_chat_request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, parse_completion_request, completion_adapter)

    @app.post("/v1/responses")
    async def responses(request: Request) -> Response:
        # the scheduler sends the chat request it means: no internal leg here
        return await serve(request, parse_responses_request, responses_adapter,
                           internal_leg=False)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return models_list(frontend.model_name, frontend.created)

    @app.get("/health")
    async def health() -> JSONResponse:
        body = frontend.health()
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.get("/node/probe")
    async def probe() -> Response:
        # a fixed, small body other nodes time to estimate bandwidth (node/probe.py)
        return Response(PROBE_BODY, media_type="application/octet-stream")

    @app.get("/metrics")
    async def metrics() -> Response:
        stats = frontend.client.stats
        frontend.metrics.set_queue(stats.num_running, stats.num_waiting)
        content, content_type = frontend.metrics.render()
        return Response(content, media_type=content_type)

    install_security(app, frontend.config.host, frontend.config.allowed_hosts)
    return app
