"""The node frontend against a scripted fake executor (a thread speaking the real ZMQ protocol).

No model is loaded: a character-level tokenizer turns the user message into token ids, and the
fake executor replies with what the message asks for (`REPLY:<text>`, `HOLD`, `FAIL`, `CRASH`).
This covers the frontend's request handling cheaply: reasoning split, stop strings, 429, 503,
per-request errors, executor crash and restart, disconnect watching.
"""

from __future__ import annotations

import asyncio
import itertools
import threading

import httpx
import pytest
import zmq

from parallax.config import ServeConfig
from parallax.node.executor_client import ExecutorClient
from parallax.node.http_server import NodeHttpServer, build_app
from parallax.protocol.common import TokenOutput, encode
from parallax.protocol.ipc import (
    AddRequest,
    ExecutorReady,
    ExecutorStats,
    Shutdown,
    StepOutputs,
    decode_to_executor,
)
from parallax.serving.sse import parse_sse_lines

EOS = 3
BUG = 0x7F  # decoding this token raises: a stand-in for a bug in text handling
_pids = itertools.count(900_000)


class CharTokenizer:
    """One token per character; the template is a toy that may open `<think>`."""

    eos_token_id = EOS

    def __init__(self, open_think: bool = False) -> None:
        self.open_think = open_think
        self.last_kwargs: dict = {}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True, **kw):
        self.last_kwargs = kw
        text = "".join(f"[{m['role']}]{m['content']}\x1e" for m in messages) + "[assistant]"
        if self.open_think and kw.get("enable_thinking", True):
            text += "<think>\n"
        return text

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        if BUG in ids:
            raise KeyError("a token the tokenizer chokes on")
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == EOS))


FAKE_KERNELS = {"q4_1": "avx2", "q6_k": "gather"}  # what a packed GGUF's executor reports
FAKE_DECODE_STEP = "one native call per step (native-avx2)"


class FakeExecutor:
    """A thread in place of the executor process (ProcessHandle protocol)."""

    def __init__(self, input_address: str, output_address: str, model_type: str,
                 send_ready: bool = True) -> None:
        self.pid = next(_pids)
        self.model_type = model_type
        self.send_ready = send_ready
        self.exit_code: int | None = None
        self.received: list = []  # every message from the frontend
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(input_address, output_address),
                                        daemon=True)
        self._thread.start()

    def poll(self) -> int | None:
        return None if self._thread.is_alive() else (self.exit_code or 0)

    def kill(self) -> None:
        self._stop.set()

    def _run(self, input_address: str, output_address: str) -> None:
        ctx = zmq.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.connect(input_address)
        push.connect(output_address)
        try:
            if self.send_ready:
                push.send(encode(ExecutorReady(
                    pid=self.pid, model_name="fake", model_type=self.model_type, start_layer=0,
                    end_layer=2, num_layers=2, max_model_len=512, block_size=16,
                    num_total_blocks=64, eos_token_ids=[EOS], tokenizer_path="", device="cpu",
                    dtype="float32", load_seconds=0.0, kernels=FAKE_KERNELS,
                    decode_step=FAKE_DECODE_STEP)))
            stats = ExecutorStats(0, 0, 64, 64)
            while not self._stop.is_set():
                if not pull.poll(20):
                    continue
                message = decode_to_executor(pull.recv())
                self.received.append(message)
                if isinstance(message, Shutdown):
                    return
                if not isinstance(message, AddRequest):
                    continue
                prompt = "".join(chr(t) for t in message.prompt_token_ids)
                user = prompt.split("[user]")[-1].split("\x1e")[0]
                if user == "CRASH":
                    self.exit_code = 1
                    return
                if user == "HOLD":
                    continue
                if user == "FAIL":
                    out = [TokenOutput(message.rid, finished=True, finish_reason="error",
                                       error="boom in the executor")]
                    push.send(encode(StepOutputs(out, stats)))
                    continue
                text = user.removeprefix("REPLY:")
                ids = [ord(c) for c in text][: message.sampling_params.max_tokens]
                ids = ids[message.num_resumed_tokens:]  # a replay goes on after those
                for i, token in enumerate(ids):
                    last = i == len(ids) - 1
                    out = TokenOutput(message.rid, token, last, "length" if last else None)
                    push.send(encode(StepOutputs([out], stats)))
        finally:
            pull.close(0)
            push.close(0)
            ctx.term()


class Harness:
    def __init__(self, model_type: str = "llama", open_think: bool = False,
                 send_ready: bool = True, **config) -> None:
        self.config = ServeConfig(model="fake", **config)
        self.launched: list[FakeExecutor] = []
        self.model_type, self.send_ready = model_type, send_ready
        self.tokenizer = CharTokenizer(open_think)

    def _launch(self, _config, input_address, output_address) -> FakeExecutor:
        fake = FakeExecutor(input_address, output_address, self.model_type, self.send_ready)
        self.launched.append(fake)
        return fake

    async def __aenter__(self):
        client = ExecutorClient(self.config.executor, launcher=self._launch, max_restarts=2)
        self.frontend = NodeHttpServer(self.config, client, "fake", tokenizer=self.tokenizer)
        await self.frontend.start()
        if self.send_ready:
            await asyncio.wait_for(self.frontend.wait_ready(), 5)
        self.http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(self.frontend)),
                                      base_url="http://127.0.0.1", timeout=10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()
        await self.frontend.close()
        for fake in self.launched:
            fake.kill()

    async def chat(self, content: str, **body) -> httpx.Response:
        body = {"messages": [{"role": "user", "content": content}], **body}
        return await self.http.post("/v1/chat/completions", json=body)

    async def stream(self, content: str, **body) -> list:
        response = await self.chat(content, stream=True, **body)
        assert response.status_code == 200, response.text
        return list(parse_sse_lines(response.text.splitlines()))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def texts(events: list, key: str) -> str:
    return "".join(e["choices"][0]["delta"].get(key, "") for e in events
                   if isinstance(e, dict) and e.get("object") == "chat.completion.chunk")


def test_plain_reply_and_stream_shape():
    async def scenario():
        async with Harness() as h:
            r = await h.chat("REPLY:Hello world")
            assert r.status_code == 200
            body = r.json()
            assert body["choices"][0]["message"]["content"] == "Hello world"
            assert "reasoning_content" not in body["choices"][0]["message"]
            assert body["usage"]["completion_tokens"] == len("Hello world")
            assert set(body["metrics"]) == {"ttft_ms", "tps", "duration_ms"}
            events = await h.stream("REPLY:Hi there", rid="my-rid")
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
            assert all(c["id"] == "my-rid" and "usage" in c for c in chunks)
            assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
            assert texts(events, "content") == "Hi there"

    run(scenario())


@pytest.mark.parametrize("stream", [True, False])
def test_reasoning_split_qwen3(stream):
    output = "<think>\nLet me see.\n</think>\n\nThe answer."

    async def scenario():
        async with Harness(model_type="qwen3") as h:
            if stream:
                events = await h.stream("REPLY:" + output)
                assert texts(events, "reasoning_content") == "Let me see."
                assert texts(events, "content") == "The answer."
            else:
                message = (await h.chat("REPLY:" + output)).json()["choices"][0]["message"]
                assert message["reasoning_content"] == "Let me see."
                assert message["content"] == "The answer."

    run(scenario())


def test_reasoning_with_think_opened_by_template_and_kwargs_reach_template():
    async def scenario():
        async with Harness(model_type="qwen3", open_think=True) as h:
            events = await h.stream("REPLY:pondering</think>Done.")
            assert texts(events, "reasoning_content") == "pondering"
            assert texts(events, "content") == "Done."
            kwargs = {"enable_thinking": False}
            r = await h.chat("REPLY:Done.", chat_template_kwargs=kwargs)
            assert h.tokenizer.last_kwargs == kwargs
            assert r.json()["choices"][0]["message"]["content"] == "Done."

    run(scenario())


def test_harmony_split():
    output = ("<|channel|>analysis<|message|>think hard<|end|><|start|>assistant"
              "<|channel|>final<|message|>42<|return|>")

    async def scenario():
        async with Harness(model_type="gpt_oss") as h:
            events = await h.stream("REPLY:" + output)
            assert texts(events, "reasoning_content") == "think hard"
            assert texts(events, "content") == "42"

    run(scenario())


def test_stop_string_split_across_tokens_never_leaks():
    async def scenario():
        async with Harness() as h:
            events = await h.stream("REPLY:one two STOP three", stop=["STOP"])
            assert texts(events, "content") == "one two "
            assert events[-2]["choices"][0]["finish_reason"] == "stop"
            body = (await h.chat("REPLY:abcXYZdef", stop=["XY", "Zd"])).json()
            assert body["choices"][0]["message"]["content"] == "abc"

    run(scenario())


def test_queue_full_is_429_and_duplicate_rid_is_400():
    async def scenario():
        async with Harness(max_batch_size=1, max_waiting=1) as h:
            held = [asyncio.create_task(h.chat("HOLD", rid=f"held-{i}")) for i in range(2)]
            for _ in range(100):
                if len(h.frontend.client.requests) == 2:
                    break
                await asyncio.sleep(0.01)
            r = await h.chat("REPLY:x")
            assert r.status_code == 429
            assert r.json()["type"] == "rate_limit_error" and r.json()["code"] == 429
            r = await h.chat("REPLY:x", rid="held-0")
            assert r.status_code == 400 and "already running" in r.json()["message"]
            for task in held:
                task.cancel()

    run(scenario())


def test_executor_error_fails_only_that_request():
    async def scenario():
        async with Harness() as h:
            r = await h.chat("FAIL")
            assert r.status_code == 500
            assert r.json() == {"object": "error", "message": "boom in the executor",
                                "type": "internal_error", "code": 500}
            events = await h.stream("FAIL")
            assert events[-1] == "[DONE]"
            assert events[-2]["object"] == "error" and events[-2]["code"] == 500
            assert events[-3]["choices"][0]["finish_reason"] == "error"
            assert (await h.chat("REPLY:ok")).json()["choices"][0]["message"]["content"] == "ok"

    run(scenario())


def test_executor_crash_fails_in_flight_then_503_then_recovers():
    async def scenario():
        async with Harness() as h:
            held = asyncio.create_task(h.chat("HOLD", stream=True))
            for _ in range(100):
                if h.frontend.client.requests:
                    break
                await asyncio.sleep(0.01)
            first = h.launched[0]
            await h.chat("CRASH")  # the fake dies; the held request must end with an error
            response = await held
            events = list(parse_sse_lines(response.text.splitlines()))
            assert events[-1] == "[DONE]" and events[-2]["object"] == "error"
            assert events[-2]["code"] == 503
            assert first.poll() is not None
            for _ in range(200):
                if h.frontend.status() == "ready" and len(h.launched) == 2:
                    break
                await asyncio.sleep(0.02)
            assert h.frontend.client.num_restarts == 1
            r = await h.chat("REPLY:back")
            assert r.json()["choices"][0]["message"]["content"] == "back"

    run(scenario())


def test_executor_dying_during_shutdown_is_not_restarted():
    """SIGTERM reaches the executor too (same process group): no restart while stopping."""
    async def scenario():
        async with Harness() as h:
            h.frontend.client.begin_shutdown()
            await h.chat("CRASH")
            await asyncio.sleep(1.0)  # the watch loop has seen the exit by now
            assert len(h.launched) == 1 and h.frontend.client.num_restarts == 0

    run(scenario())


def test_cluster_node_requires_the_join_token():
    async def scenario():
        async with Harness() as h:
            h.frontend.join_token = "s3cret"
            for headers in ({}, {"X-Join-Token": "wrong"}):
                r = await h.http.post("/v1/chat/completions", headers=headers, json={
                    "messages": [{"role": "user", "content": "REPLY:x"}]})
                assert r.status_code == 401 and r.json()["object"] == "error"
            r = await h.http.post("/v1/chat/completions", headers={"X-Join-Token": "s3cret"},
                                  json={"messages": [{"role": "user", "content": "REPLY:ok"}]})
            assert r.json()["choices"][0]["message"]["content"] == "ok"

    run(scenario())


def test_not_ready_is_503_and_health_says_loading():
    async def scenario():
        async with Harness(send_ready=False) as h:
            r = await h.chat("REPLY:x")
            assert r.status_code == 503 and r.json()["type"] == "service_unavailable"
            health = await h.http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"

    run(scenario())


def test_health_names_the_kernel_path_of_each_packed_weight_type():
    async def scenario():
        async with Harness() as h:
            health = await h.http.get("/health")
            assert health.status_code == 200 and health.json()["kernels"] == FAKE_KERNELS
            assert health.json()["decode_step"] == FAKE_DECODE_STEP

    run(scenario())


def test_body_limit_413_and_model_404():
    async def scenario():
        async with Harness(max_body_bytes=1000) as h:
            r = await h.chat("x" * 2000)
            assert r.status_code == 413 and r.json()["code"] == 413
            r = await h.chat("REPLY:x", model="other-model")
            assert r.status_code == 404 and "other-model" in r.json()["message"]
            assert (await h.chat("REPLY:x", model="default")).status_code == 200

    run(scenario())


def test_prompt_too_long_and_max_tokens_capped():
    async def scenario():
        async with Harness() as h:  # fake context: 512 tokens
            r = await h.chat("y" * 600)
            assert r.status_code == 400 and "context" in r.json()["message"]
            body = (await h.chat("REPLY:abc", max_tokens=100000)).json()
            assert body["choices"][0]["message"]["content"] == "abc"

    run(scenario())


def test_frontend_bug_in_one_request_fails_only_that_request():
    async def scenario():
        async with Harness() as h:
            events = await h.stream("REPLY:ab\x7fcd")
            assert events[-1] == "[DONE]" and events[-2]["code"] == 500
            assert "internal error" in events[-2]["message"]
            r = await h.chat("REPLY:ab\x7fcd")
            assert r.status_code == 500 and r.json()["object"] == "error"
            assert (await h.chat("REPLY:fine")).json()["choices"][0]["message"]["content"] \
                == "fine"
            assert not h.frontend.client.requests

    run(scenario())


def test_internal_leg_carries_token_ids_and_a_replay_resumes_after_them():
    """The scheduler's leg (parallax/serving/internal_leg.py): ids on every chunk, the last
    delta inside the final chunk, failure kinds; a replay prefills prompt + ids, goes on."""
    output = "<think>ab</think>ok"

    async def scenario():
        async with Harness(model_type="qwen3") as h:
            events = await h.stream("REPLY:" + output, parallax={"internal": True})
            chunks = [e for e in events if isinstance(e, dict)]
            ids = [i for c in chunks for i in c.get("parallax", {}).get("token_ids", [])]
            assert ids == [ord(c) for c in output]
            assert chunks[-1]["parallax"]["reasoning"] is True
            assert texts(events, "reasoning_content") == "ab"
            assert texts(events, "content") == "ok"
            resumed = ids[:9]  # "<think>ab": the client has seen the reasoning "ab"
            events = await h.stream("REPLY:" + output, rid="replay-1",
                                    parallax={"internal": True, "resume_token_ids": resumed})
            assert texts(events, "reasoning_content") == "" and texts(events, "content") == "ok"
            assert events[-2]["usage"]["completion_tokens"] == len(output)
            add = [m for m in h.launched[-1].received if isinstance(m, AddRequest)][-1]
            assert add.rid == "replay-1" and add.num_resumed_tokens == 9
            assert add.prompt_token_ids[-9:] == resumed
            assert add.sampling_params.max_tokens > len(output)  # resumed ids count in it
            events = await h.stream("FAIL", parallax={"internal": True})
            assert events[-2]["parallax"] == {"kind": "engine_error", "peer": None}
            bad = await h.chat("REPLY:x", stream=True,
                               parallax={"internal": True, "resume_token_ids": [-1]})
            assert bad.status_code == 400
            plain = await h.stream("REPLY:x")  # without the flag nothing internal is added
            assert not any("parallax" in e for e in plain if isinstance(e, dict))

    run(scenario())
