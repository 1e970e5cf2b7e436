"""`to_body()`: a validated request as the normalized body the scheduler forwards to a head node,
which parses it again. Parsing that body must give the same request back, field for field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from parallax.serving.completions import TextCompletionRequest, parse_completion_request
from parallax.serving.openai_schemas import ChatCompletionRequest, parse_chat_request

SCHEDULER_FIELDS = {"model", "rid", "routing_table"}  # the scheduler sets its own
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                         "strict": True,
                                         "parameters": {"type": "object", "properties": {
                                             "city": {"type": "string"}}}}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer"}}}
# between them, every field of a chat request away from its default
CHAT_BODIES: list[dict[str, Any]] = [
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."},
                                                 {"type": "text", "text": "Be kind."}]},
                  {"role": "user", "content": "Weather in Paris?", "name": "ann"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": "{\"city\": \"P\"}"}}]},
                  {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}],
     "stream": True, "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9,
     "top_k": -1, "min_p": 0.1, "stop": "END", "seed": 7, "presence_penalty": 0.5,
     "frequency_penalty": -0.5, "stream_options": {"include_usage": True},
     "chat_template_kwargs": {"enable_thinking": False}, "ignore_eos": True,
     "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
     "parallel_tool_calls": False, "logprobs": True, "top_logprobs": 3, "priority": -2,
     "model": "m", "rid": "r", "routing_table": [], "user": "u", "n": 1},
    {"messages": [{"role": "user", "content": "A number?"}], "tools": [TOOL],
     "response_format": {"type": "json_schema",
                         "json_schema": {"name": "n", "schema": SCHEMA, "strict": True}}},
    {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
     "tools": [TOOL]},
    {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"},
     "tool_choice": "none", "tools": [TOOL]},
]
COMPLETION_BODIES: list[dict[str, Any]] = [
    {"prompt": ["Once upon"], "echo": True, "max_tokens": 5, "stop": ["."], "seed": 3,
     "stream": True, "stream_options": {"include_usage": True}, "user": "u"},
    {"prompt": [1, 2, 3], "logprobs": 2, "temperature": 0, "priority": 4, "ignore_eos": True,
     "top_p": 0.5, "top_k": 4, "min_p": 0.2, "presence_penalty": 1, "frequency_penalty": 1.5},
    {"prompt": "x", "logprobs": 0, "response_format": {"type": "json_object"}},
]


def _without_scheduler_fields(req: Any) -> Any:
    return dataclasses.replace(req, model=None, rid=None, routing_table=None)


@pytest.mark.parametrize("body", CHAT_BODIES)
def test_a_chat_request_survives_its_body(body: dict[str, Any]) -> None:
    req = parse_chat_request(body)
    forwarded = req.to_body()
    assert not SCHEDULER_FIELDS & forwarded.keys() and "user" not in forwarded
    assert parse_chat_request(forwarded) == _without_scheduler_fields(req)


@pytest.mark.parametrize("body", COMPLETION_BODIES)
def test_a_completion_request_survives_its_body(body: dict[str, Any]) -> None:
    req = parse_completion_request(body)
    assert parse_completion_request(req.to_body()) == _without_scheduler_fields(req)


@pytest.mark.parametrize(("kind", "parse", "bodies"), [
    (ChatCompletionRequest, parse_chat_request, CHAT_BODIES),
    (TextCompletionRequest, parse_completion_request, COMPLETION_BODIES),
])
def test_the_bodies_above_set_every_field(kind, parse, bodies) -> None:
    # a field added to the request without `to_body` fails here until a body above sets it
    requests = [parse(body) for body in bodies]
    default = kind(messages=[])
    unset = [f.name for f in dataclasses.fields(kind) if f.name not in SCHEDULER_FIELDS
             and all(getattr(r, f.name) == getattr(default, f.name) for r in requests)]
    chat_only = {"messages", "chat_template_kwargs", "tools", "tool_choice_name",
                 "parallel_tool_calls"}  # /v1/completions refuses them
    assert set(unset) <= (chat_only if kind is TextCompletionRequest else set())
