"""Chat-completions request validation, sampling params and response builders."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from parallax.engine.sampling_params import SamplingParams
from parallax.serving.errors import APIError
from parallax.serving.openai_schemas import (
    ALLOWED_TEMPLATE_KWARGS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    check_model_name,
    chunk,
    completion,
    models_list,
    parse_chat_request,
    parse_json_body,
    to_sampling_params,
    usage_dict,
)

USER = [{"role": "user", "content": "hi"}]


def body(**kw: Any) -> dict[str, Any]:
    return {"messages": USER, **kw}


def bad(payload: Any) -> str:
    with pytest.raises(APIError) as info:
        parse_chat_request(payload)
    assert info.value.status == 400
    assert info.value.type == "invalid_request_error"
    return info.value.message


def test_minimal_request_defaults() -> None:
    req = parse_chat_request(body())
    assert isinstance(req, ChatCompletionRequest)
    assert req.template_messages() == [{"role": "user", "content": "hi"}]
    assert req.stream is False and req.include_usage is False
    assert req.max_tokens is None and req.temperature is None and req.top_p is None
    assert req.stop == [] and req.chat_template_kwargs == {} and req.model is None
    assert req.rid is None and req.routing_table is None


def test_full_request() -> None:
    req = parse_chat_request(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "developer", "content": "dev"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
                {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
            ],
            "stream": True,
            "max_tokens": 10,
            "temperature": 0,
            "top_p": 0.5,
            "top_k": 40,
            "min_p": 0.1,
            "stop": "END",
            "seed": 7,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"enable_thinking": False},
            "model": "default",
            "rid": "req-1",
            "routing_table": [{"node": "a"}, "b"],
            "user": "ignored-unknown-field",
        }
    )
    assert [m.role for m in req.messages] == ["system", "developer", "user", "assistant", "tool"]
    assert req.messages[2].content == "a\nb"
    msgs = req.template_messages()
    assert msgs[3] == {"role": "assistant", "content": "", "tool_calls": []}
    assert msgs[4]["tool_call_id"] == "c1"
    assert req.stream and req.include_usage
    assert (req.max_tokens, req.temperature, req.top_p, req.top_k, req.min_p) == (
        10,
        0.0,
        0.5,
        40,
        0.1,
    )
    assert req.stop == ["END"] and req.seed == 7
    assert (req.presence_penalty, req.frequency_penalty) == (0.5, -0.5)
    assert req.chat_template_kwargs == {"enable_thinking": False}
    assert req.model == "default" and req.rid == "req-1"
    assert req.routing_table == [{"node": "a"}, "b"]


def test_max_completion_tokens_wins() -> None:
    assert parse_chat_request(body(max_completion_tokens=5)).max_tokens == 5
    assert parse_chat_request(body(max_tokens=9, max_completion_tokens=5)).max_tokens == 5
    assert parse_chat_request(body(max_tokens=9)).max_tokens == 9


@pytest.mark.parametrize(
    ("payload", "fragments"),
    [
        ([1, 2], ["body", "object"]),
        ({}, ["'messages'", "required"]),
        ({"messages": []}, ["'messages'", "at least one"]),
        ({"messages": "hi"}, ["'messages'", "array"]),
        ({"messages": ["hi"]}, ["messages[0]", "object"]),
        ({"messages": [{"content": "x"}]}, ["messages[0].role", "required"]),
        ({"messages": [{"role": "bot", "content": "x"}]}, ["messages[0].role", "'bot'", "user"]),
        ({"messages": [{"role": "user"}]}, ["messages[0].content", "required"]),
        ({"messages": [{"role": "user", "content": 3}]}, ["messages[0].content", "number"]),
        ({"messages": [{"role": "user", "content": None}]}, ["messages[0].content", "null"]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            ["messages[0].content[0].type", "text"],
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            ["messages[0].content[0].text", "string"],
        ),
        (body(stream="yes"), ["'stream'", "boolean"]),
        (body(max_tokens=0), ["'max_tokens'", "> 0"]),
        (body(max_tokens=-3), ["'max_tokens'", "> 0"]),
        (body(max_tokens="10"), ["'max_tokens'", "integer"]),
        (body(max_tokens=1.5), ["'max_tokens'", "integer"]),
        (body(max_tokens=True), ["'max_tokens'", "integer"]),
        (body(max_completion_tokens=0), ["'max_completion_tokens'", "> 0"]),
        (body(temperature=-0.1), ["'temperature'", ">= 0"]),
        (body(temperature="hot"), ["'temperature'", "number"]),
        (body(temperature=float("nan")), ["'temperature'", "finite"]),
        (body(top_p=0), ["'top_p'", "(0, 1]"]),
        (body(top_p=1.01), ["'top_p'", "(0, 1]"]),
        (body(top_k=-2), ["'top_k'"]),
        (body(top_k=2.5), ["'top_k'", "integer"]),
        (body(min_p=1.5), ["'min_p'", "[0, 1]"]),
        (body(stop=5), ["'stop'", "string"]),
        (body(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)]),
         ["'stop'", f"at most {MAX_STOP_STRINGS}"]),
        (body(stop=["ok", "x" * (MAX_STOP_CHARS + 1)]),
         ["stop[1]", f"at most {MAX_STOP_CHARS} characters"]),
        ({"messages": USER * (MAX_MESSAGES + 1)}, ["'messages'", f"at most {MAX_MESSAGES}"]),
        (body(top_k=2**64), ["'top_k'", "2147483647"]),
        (body(stop=["a", 1]), ["stop[1]", "string"]),
        (body(stop=[""]), ["stop[0]", "empty"]),
        (body(seed="x"), ["'seed'", "integer"]),
        (body(seed=2**70), ["'seed'", "64 bits"]),
        (body(presence_penalty=3), ["'presence_penalty'", "[-2, 2]"]),
        (body(frequency_penalty=-2.5), ["'frequency_penalty'", "[-2, 2]"]),
        (body(stream_options=[]), ["'stream_options'", "object"]),
        (body(stream_options={"include_usage": "y"}), ["stream_options.include_usage", "boolean"]),
        (body(chat_template_kwargs="x"), ["'chat_template_kwargs'", "object"]),
        (body(chat_template_kwargs={"chat_template": "{% for i in range(9**9) %}{% endfor %}"}),
         ["chat_template_kwargs.chat_template", "not accepted", *ALLOWED_TEMPLATE_KWARGS]),
        (body(chat_template_kwargs={"enable_thinking": False, "tools": []}),
         ["chat_template_kwargs.tools", "not accepted", "enable_thinking"]),
        (body(chat_template_kwargs={"enable_thinking": {"a": 1}}),
         ["chat_template_kwargs.enable_thinking", "boolean", "object"]),
        (body(chat_template_kwargs={"reasoning_effort": "x" * 65}),
         ["chat_template_kwargs.reasoning_effort", "at most 64"]),
        (body(model=3), ["'model'", "string"]),
        (body(rid=""), ["'rid'"]),
        (body(rid=5), ["'rid'"]),
        (body(routing_table={"a": 1}), ["'routing_table'", "array"]),
        (body(n=2), ["'n'"]),
        (body(top_logprobs=3), ["'top_logprobs'", "'logprobs' to be true"]),
        (body(logprobs=True, top_logprobs=21), ["'top_logprobs'", "[0, 20]"]),
        (body(logprobs=True, top_logprobs=-1), ["'top_logprobs'", "[0, 20]"]),
        (body(logprobs=True, top_logprobs=2.5), ["'top_logprobs'", "integer"]),
        (body(logprobs=True, top_logprobs="3"), ["'top_logprobs'", "integer"]),
        (body(logprobs="yes"), ["'logprobs'", "boolean"]),
        (body(logit_bias={"50256": -100}), ["'logit_bias'"]),
        (body(priority=21), ["'priority'", "[-20, 20]"]),
        (body(priority=-21), ["'priority'"]),
        (body(priority="high"), ["'priority'"]),
        (body(response_format={"type": "xml"}), ["'response_format.type'", "json_schema"]),
        (body(response_format="json"), ["'response_format'", "object"]),
        (body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
         ["'response_format.json_schema.name'"]),
        (body(response_format={"type": "json_schema",
                               "json_schema": {"name": "x", "schema": {"type": "foo"}}}),
         ["'response_format.json_schema.schema'", "foo"]),
        (body(audio={"voice": "alloy"}), ["'audio'"]),
        (body(modalities=["text", "audio"]), ["'modalities'"]),
        (body(functions=[{"name": "f"}]), ["'functions'"]),
        (body(logprobs=0), ["'logprobs'", "boolean"]),  # 0 is not False
    ],
)
def test_invalid_requests_name_the_field(payload: Any, fragments: list[str]) -> None:
    message = bad(payload)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_boundaries_accepted() -> None:
    req = parse_chat_request(body(top_p=1, temperature=0, top_k=-1, min_p=0, max_tokens=1, seed=-1))
    assert req.top_p == 1.0 and req.temperature == 0.0 and req.max_tokens == 1
    stops = [chr(65 + i) * MAX_STOP_CHARS for i in range(MAX_STOP_STRINGS)]
    assert parse_chat_request(body(stop=stops)).stop == stops
    assert len(parse_chat_request({"messages": USER * MAX_MESSAGES}).messages) == MAX_MESSAGES
    kwargs = {"enable_thinking": True, "thinking": None, "reasoning_effort": "high"}
    assert parse_chat_request(body(chat_template_kwargs=kwargs)).chat_template_kwargs == kwargs
    assert parse_chat_request(body(max_tokens=4.0)).max_tokens == 4
    assert parse_chat_request(body(stream=None, stop=None, n=1)).stream is False
    assert to_sampling_params(parse_chat_request(body(priority=-20)), 16).priority == -20
    assert to_sampling_params(parse_chat_request(body()), 16).priority == 0
    # what "absent" means for the unsupported fields, and fields that change nothing
    parse_chat_request(body(logprobs=False, logit_bias={}, response_format={"type": "text"},
                            modalities=["text"], top_logprobs=None, user="u",
                            metadata={"k": "v"}, store=False, service_tier="auto"))


def test_parse_json_body() -> None:
    assert parse_json_body(b'{"a": [1]}') == {"a": [1]}
    for raw in (b"", b"  ", b"{", b"nope"):
        with pytest.raises(APIError) as info:
            parse_json_body(raw)
        assert info.value.status == 400


def test_to_sampling_params_defaults() -> None:
    params = to_sampling_params(parse_chat_request(body()), 128, [2, 5, 2])
    assert params == SamplingParams(max_tokens=128, stop_token_ids=(2, 5))
    assert params.temperature == 1.0 and params.top_p == 1.0


def test_to_sampling_params_values() -> None:
    req = parse_chat_request(
        body(
            temperature=0,
            top_p=0.9,
            top_k=-1,
            min_p=0.05,
            seed=3,
            presence_penalty=1,
            frequency_penalty=0.5,
            max_completion_tokens=7,
            ignore_eos=True,
        )
    )
    params = to_sampling_params(req, 128, ())
    assert params.is_greedy
    tiny = to_sampling_params(parse_chat_request(body(temperature=1e-45)), 8, ())
    assert tiny.is_greedy and tiny.temperature == 1e-45  # too small to divide by: greedy
    assert (params.top_p, params.top_k, params.min_p, params.seed) == (0.9, 0, 0.05, 3)
    assert (params.presence_penalty, params.frequency_penalty) == (1.0, 0.5)
    assert params.max_tokens == 7 and params.ignore_eos and params.stop_token_ids == ()


def test_to_sampling_params_rejects_bad_default() -> None:
    with pytest.raises(APIError) as info:
        to_sampling_params(parse_chat_request(body()), 0, ())
    assert info.value.status == 400 and "max_tokens" in info.value.message


def test_check_model_name() -> None:
    served = "HuggingFaceTB/SmolLM2-135M-Instruct"
    for name in (None, "", "default", served, "SmolLM2-135M-Instruct"):
        assert check_model_name(name, served) == served
    with pytest.raises(APIError) as info:
        check_model_name("gpt-4", served)
    assert info.value.status == 404 and info.value.type == "not_found_error"
    assert "gpt-4" in info.value.message


def test_chunk_builder() -> None:
    usage = usage_dict(3, 2)
    assert usage == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    c = chunk("r1", "m", 100, {"role": "assistant", "content": ""}, None, usage)
    assert c == {
        "id": "r1",
        "object": "chat.completion.chunk",
        "created": 100,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}
        ],
        "usage": usage,
    }
    metrics = {"ttft_ms": 1.0, "tps": 2.0, "duration_ms": 3.0}
    last = chunk("r1", "m", 100, {}, "stop", usage, metrics=metrics)
    assert last["choices"][0]["finish_reason"] == "stop" and last["metrics"] == metrics


def test_completion_builder() -> None:
    usage = usage_dict(4, 6)
    metrics = {"ttft_ms": 1.0, "tps": 2.0, "duration_ms": 3.0}
    out = completion("r2", "m", 5, "answer", None, "length", usage, metrics)
    assert out["object"] == "chat.completion" and out["id"] == "r2" and out["created"] == 5
    assert out["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "answer"},
            "logprobs": None,
            "finish_reason": "length",
        }
    ]
    assert out["usage"] == usage and out["metrics"] == metrics
    think = completion("r2", "m", 5, "a", "because", "stop", usage, metrics)
    assert think["choices"][0]["message"]["reasoning_content"] == "because"


def test_models_list() -> None:
    out = models_list("my-model", created=9)
    assert out == {
        "object": "list",
        "data": [{"id": "my-model", "object": "model", "created": 9, "owned_by": "parallax"}],
    }
    assert isinstance(models_list("x")["data"][0]["created"], int)


def test_serving_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import parallax.serving, parallax.serving.errors, parallax.serving.openai_schemas\n"
        "import parallax.serving.sse, parallax.serving.detokenizer, parallax.serving.stop\n"
        "import parallax.serving.reasoning, parallax.serving.metrics\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
