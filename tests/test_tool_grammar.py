"""Tool-call grammars for every parsed format, lazy `"auto"` calls, and reasoning first (issue 14).

A random-weight tiny llama (tests/structured_helpers.py) samples at temperature 1.0 among the
tokens the grammar allows, so its answers are adversarial: a forced call must still parse with
the format's own parser (serving/tool_calls.py) into calls whose arguments validate. Under
`"auto"`, a call the model has started (replayed as already generated tokens: text, then the
family's marker) must finish as a valid call; without the grammar the same start does not.
Reasoning: after a replayed thinking block the answer is still constrained, and the thinking
itself is free.
"""

from __future__ import annotations

import json

import pytest
import torch
from structured_helpers import (
    SCHEMA,
    WEATHER_TOOL,
    check_schema,
    make_engine,
    prompt_ids,
    run,
    save_random_model,
)

from parallax.engine.grammar import GrammarMasker
from parallax.engine.sampling_params import SamplingParams
from parallax.models.loader import load_shard
from parallax.node.http_server import NodeHttpServer
from parallax.serving.reasoning import HarmonyParser, ThinkParser
from parallax.serving.structured import grammar_vocab_json, tokenizer_json
from parallax.serving.tool_calls import HarmonyToolParser, ToolCall, make_tool_parser
from parallax.serving.tool_grammar import GrammarContext, answer_grammar, tool_call_grammar

SPECIAL = ("[TOOL_CALLS]", "<|python_tag|>", "<|channel|>", "<|message|>", "<|end|>",
           "<|start|>", "<|constrain|>")
ADDED = ("<tool_call>", "<think>", "</think>", "<minimax:tool_call>")
ORDER_TOOL = {"type": "function", "function": {"name": "order", "parameters": SCHEMA}}
TOOLS = [WEATHER_TOOL, ORDER_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
FORMATS = ("hermes", "llama3", "mistral", "minimax", "harmony")
# what an "auto" answer writes before its call: text then the marker (llama3 and mistral calls
# come first in the answer, as their parsers read them)
CALL_STARTS = {"hermes": "Let me look. <tool_call>", "llama3": "<|python_tag|>",
               "mistral": "[TOOL_CALLS]", "minimax": "Checking.\n<minimax:tool_call>",
               "harmony": "<|channel|>commentary to=functions.get_weather "}
# a valid call of WEATHER_TOOL in each format (the matcher tests)
GOOD = {
    "hermes": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}'
              '\n</tool_call>',
    "llama3": '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}',
    "mistral": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}]',
    "minimax": '<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris'
               '</parameter>\n<parameter name="days">3</parameter>\n</invoke>\n'
               '</minimax:tool_call>',
    "harmony": '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
               '{"city": "Paris", "days": 3}',
}


@pytest.fixture(scope="module")
def marked_model(tmp_path_factory):
    path, tokenizer = save_random_model(tmp_path_factory.mktemp("tool-grammar"),
                                        special=SPECIAL, added=ADDED)
    return tokenizer, load_shard(path).model


def context(tokenizer, thinking: str = "none") -> GrammarContext:
    return GrammarContext(tokenizer.get_added_vocab(), thinking)


def decode(tokenizer, tokens: list[int], fmt: str) -> str:
    tokens = [t for t in tokens if t != tokenizer.eos_token_id]
    return tokenizer.decode(tokens, skip_special_tokens=fmt != "harmony")


def parse(fmt: str, text: str) -> tuple[list[ToolCall], str]:
    """The format's own parser on an answer: (calls, answer text)."""
    if fmt == "harmony":
        parser = HarmonyToolParser()
        _, content = parser.feed(text)
        content += parser.flush()[1]
        pieces = parser.take_calls()
    else:
        parser = make_tool_parser(fmt, TOOLS)
        pieces = parser.feed(text) + parser.flush()
        content = ""
    calls = [p for p in pieces if isinstance(p, ToolCall)]
    return calls, content + "".join(p for p in pieces if isinstance(p, str))


def assert_valid_calls(calls: list[ToolCall], text: str) -> None:
    assert calls, f"no call in {text!r}"
    for call in calls:
        check_schema(json.loads(call.arguments), SCHEMAS[call.name])


def matches(tokenizer, grammar: str, text: str) -> tuple[bool, bool]:
    """(the text is a prefix the grammar allows, the grammar accepts it complete)."""
    import llguidance

    vocab = llguidance.LLTokenizer(tokenizer_json(tokenizer), eos_token=[tokenizer.eos_token_id])
    matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
    ok = matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False))
    return ok and not matcher.is_error(), matcher.is_accepting()


# ---------------------------------------------------------------- the grammars themselves


@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_grammar_accepts_a_call_and_nothing_else(marked_model, fmt):
    tokenizer, _ = marked_model
    grammar = tool_call_grammar([WEATHER_TOOL], fmt, False, ctx=context(tokenizer))
    assert matches(tokenizer, grammar, GOOD[fmt]) == (True, True)
    assert matches(tokenizer, grammar, "Sure: " + GOOD[fmt])[0] is False  # no text first
    assert matches(tokenizer, grammar, GOOD[fmt].replace("Paris", "Oslo"))[0] is False
    assert matches(tokenizer, grammar, GOOD[fmt].replace("3", "9"))[0] is False  # days <= 7


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_grammar_allows_text_but_constrains_a_started_call(marked_model, fmt):
    tokenizer, _ = marked_model
    grammar = tool_call_grammar([WEATHER_TOOL], fmt, True, auto=True, ctx=context(tokenizer))
    assert matches(tokenizer, grammar, GOOD[fmt]) == (True, True)
    if fmt == "harmony":  # a harmony answer is a final-channel message
        assert matches(tokenizer, grammar, "<|channel|>final<|message|>Hi there.") == (True, True)
    else:
        assert matches(tokenizer, grammar, "Hi there, no call needed.") == (True, True)
    start = CALL_STARTS[fmt] if fmt != "harmony" else "<|channel|>commentary to=functions."
    assert matches(tokenizer, grammar, start + "x")[0] is False  # started: must be a call
    bad = GOOD[fmt].replace("Paris", "Oslo")
    assert matches(tokenizer, grammar, bad)[0] is False


def test_auto_with_response_format_is_the_json_or_a_call(marked_model):
    tokenizer, _ = marked_model
    grammar = tool_call_grammar([WEATHER_TOOL], "hermes", True, auto=True,
                                ctx=context(tokenizer), answer_schema=SCHEMA)
    answer = '{"color": "red", "amount": 3, "tags": []}'
    assert matches(tokenizer, grammar, answer) == (True, True)
    assert matches(tokenizer, grammar, GOOD["hermes"]) == (True, True)
    assert matches(tokenizer, grammar, "Plain text.")[0] is False


# ---------------------------------------------------------------- random weights, temperature 1


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_forced_calls_from_random_weights_parse_and_validate(marked_model, fmt):
    tokenizer, model = marked_model
    engine = make_engine(model, tokenizer)
    prompt = prompt_ids(tokenizer, "Weather in Paris, then order something.")
    requests = {}
    for seed in range(3):
        parallel = seed == 2 and fmt != "harmony"
        grammar = tool_call_grammar(TOOLS, fmt, parallel, ctx=context(tokenizer))
        requests[f"{seed}"] = (prompt, SamplingParams(temperature=1.0, seed=seed,
                                                      max_tokens=400 if parallel else 160,
                                                      grammar=grammar))
    for rid, (tokens, reason) in run(engine, requests).items():
        text = decode(tokenizer, tokens, fmt)
        assert reason == "stop", (rid, text)
        calls, rest = parse(fmt, text)
        assert_valid_calls(calls, text)
        assert not rest.strip(), text
        if rid != "2":
            assert len(calls) == 1, text


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_call_the_model_started_finishes_valid(marked_model, fmt):
    """The answer so far is text and the marker (replayed as generated tokens): what follows is
    a valid call; the same start decoded freely is not."""
    tokenizer, model = marked_model
    prompt = prompt_ids(tokenizer, "Weather in Paris?")
    started = tokenizer.encode(CALL_STARTS[fmt], add_special_tokens=False)
    grammar = tool_call_grammar(TOOLS, fmt, False, auto=True, ctx=context(tokenizer))
    requests = {f"{seed}": (prompt + started, SamplingParams(
        temperature=1.0, seed=seed, max_tokens=160, grammar=grammar)) for seed in range(3)}
    requests["free"] = (prompt + started, SamplingParams(temperature=1.0, seed=0, max_tokens=60))
    out = run(make_engine(model, tokenizer), requests, {rid: len(started) for rid in requests})
    for rid, (tokens, reason) in out.items():
        text = decode(tokenizer, started + tokens, fmt)
        calls, _ = parse(fmt, text)
        if rid == "free":  # the test can fail: unconstrained, the call does not come out
            assert not calls, text
            continue
        assert reason == "stop", (rid, text)
        assert_valid_calls(calls, text)


@pytest.mark.slow
def test_auto_free_answers_stay_free(marked_model):
    """Free text is allowed; a call the model writes by chance (random weights write the marker
    now and then) is valid once finished."""
    tokenizer, model = marked_model
    grammar = tool_call_grammar(TOOLS, "hermes", True, auto=True, ctx=context(tokenizer))
    prompt = prompt_ids(tokenizer, "Say hello.")
    out = run(make_engine(model, tokenizer), {f"{s}": (prompt, SamplingParams(
        temperature=1.0, seed=s, max_tokens=100, grammar=grammar)) for s in range(4)})
    free = 0
    for tokens, reason in out.values():
        text = decode(tokenizer, tokens, "hermes")
        assert reason in ("stop", "length")
        calls, _ = parse("hermes", text)
        if "<tool_call>" not in text:
            assert text and not calls
            free += 1
        elif reason == "stop":  # the model called on its own: a valid call
            assert_valid_calls(calls, text)
    assert free


# ---------------------------------------------------------------- reasoning before the answer


def allowed_tokens(tokenizer, grammar: str, generated: list[int]) -> set[int]:
    masker = GrammarMasker([tokenizer.eos_token_id])
    masker.set_vocab(tokenizer_json(tokenizer))
    from types import SimpleNamespace

    seq = SimpleNamespace(sampling_params=SamplingParams(grammar=grammar), grammar=None,
                          generated_token_ids=generated)
    mask = masker.wait(masker.start([seq]))
    masker.close()
    assert not mask.errors, mask.errors
    bits = (mask.bits[0].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    return set(bits.flatten().nonzero().flatten().tolist())


def test_thinking_is_free_and_the_answer_after_it_constrained(marked_model):
    tokenizer, _ = marked_model
    word = tokenizer.encode("hello", add_special_tokens=False)[0]
    opened = tool_call_grammar([WEATHER_TOOL], "hermes", False, ctx=context(tokenizer, "open"))
    plain = tool_call_grammar([WEATHER_TOOL], "hermes", False, ctx=context(tokenizer))
    assert word in allowed_tokens(tokenizer, opened, [])  # reasoning: free text
    assert word not in allowed_tokens(tokenizer, plain, [])  # no reasoning: the call at once
    closed = tokenizer.encode("I should call it.</think>\n\n", add_special_tokens=False)
    assert word not in allowed_tokens(tokenizer, opened, closed)
    assert matches(tokenizer, opened, "Hmm.</think>\n\n" + GOOD["hermes"]) == (True, True)
    optional = tool_call_grammar([WEATHER_TOOL], "hermes", False,
                                 ctx=context(tokenizer, "optional"))
    assert matches(tokenizer, optional, GOOD["hermes"]) == (True, True)
    assert matches(tokenizer, optional, "<think>Hmm.</think>\n" + GOOD["hermes"]) == (True, True)
    harmony = tool_call_grammar([WEATHER_TOOL], "harmony", False,
                                ctx=context(tokenizer, "harmony"))
    analysis = "<|channel|>analysis<|message|>Need it.<|end|><|start|>assistant"
    assert matches(tokenizer, harmony, analysis + GOOD["harmony"]) == (True, True)


@pytest.mark.slow
def test_answers_after_replayed_reasoning_validate(marked_model):
    """Random weights after a finished thinking block: a forced call (think format), and
    `response_format` JSON (think and harmony formats) still validate, and the reasoning
    parsers split the reasoning off."""
    tokenizer, model = marked_model
    prompt = prompt_ids(tokenizer, "Think, then answer.")
    think = "I need the weather.</think>\n\n"
    analysis = "<|channel|>analysis<|message|>Need JSON.<|end|><|start|>assistant"
    cases = {
        "call": (think, tool_call_grammar(TOOLS, "hermes", False,
                                          ctx=context(tokenizer, "open"))),
        "json": ("<think>ok</think>", answer_grammar(SCHEMA, context(tokenizer, "optional"),
                                                     harmony=False)),
        "harmony": (analysis, answer_grammar(SCHEMA, context(tokenizer, "harmony"),
                                             harmony=True)),
    }
    requests, resumed = {}, {}
    for rid, (before, grammar) in cases.items():
        ids = tokenizer.encode(before, add_special_tokens=False)
        requests[rid] = (prompt + ids, SamplingParams(temperature=1.0, seed=1, max_tokens=120,
                                                      grammar=grammar))
        resumed[rid] = len(ids)
    out = run(make_engine(model, tokenizer), requests, resumed)
    for rid, (tokens, reason) in out.items():
        before = cases[rid][0]
        ids = tokenizer.encode(before, add_special_tokens=False)
        text = decode(tokenizer, ids + tokens, "harmony" if rid == "harmony" else "hermes")
        assert reason == "stop", (rid, text)
        if rid == "harmony":
            parser = HarmonyParser()
            reasoning, content = parser.feed(text)
            reasoning, content = reasoning + parser.flush()[0], content + parser.flush()[1]
        else:
            parser = ThinkParser(start_in_reasoning=rid == "call")
            reasoning, content = parser.feed(text)
            more = parser.flush()
            reasoning, content = reasoning + more[0], content + more[1]
        assert reasoning.strip() in ("I need the weather.", "ok", "Need JSON."), text
        if rid == "call":
            calls, rest = parse("hermes", content)
            assert_valid_calls(calls, content)
            assert len(calls) == 1 and not rest.strip()
        else:
            check_schema(json.loads(content), SCHEMA)


def test_thinking_mode_follows_the_reasoning_parser():
    mode = NodeHttpServer._thinking_mode
    assert mode(ThinkParser(start_in_reasoning=True), "qwen3", True, "x<think>\n") == "open"
    assert mode(ThinkParser(), "qwen3", True, "x") == "optional"
    assert mode(ThinkParser(), "qwen3", False, "x") == "none"  # thinking switched off
    assert mode(None, "llama", True, "x") == "none"
    assert mode(HarmonyParser(), "gpt_oss", True, "<|start|>assistant") == "harmony"
    assert mode(HarmonyParser("final"), "gpt_oss", True, "<|channel|>final<|message|>") == "none"


def test_grammar_vocab_only_for_tokenizers_llguidance_reads(marked_model, tmp_path):
    """A tokenizer llguidance cannot read (a bare Fuse decoder) sends no grammar vocabulary:
    forced calls and `response_format` are then a 400 at the frontend, `"auto"` stays free
    (instead of every constrained request failing on the last stage)."""
    from tiny_models import save_word_tokenizer
    from tokenizers import decoders

    tokenizer, _ = marked_model
    assert grammar_vocab_json(tokenizer) == tokenizer_json(tokenizer)
    words = save_word_tokenizer(tmp_path, ["hello", " world"], ["<|im_end|>"], [], "<|im_end|>",
                                "")
    assert grammar_vocab_json(words) is not None
    words.backend_tokenizer.decoder = decoders.Fuse()
    assert tokenizer_json(words) is not None and grammar_vocab_json(words) is None
