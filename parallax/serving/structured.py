"""Structured outputs: `response_format` and forced tool calls as llguidance grammars.

The frontend turns a request into one grammar string (llguidance's JSON form, holding a JSON
schema or a Lark grammar), validates it here (an invalid schema is a 400 naming the field, never
a failure on the last stage) and sends it in `SamplingParams.grammar`; the stage that samples
constrains decoding to it (parallax/engine/grammar.py).

- `{"type": "json_object"}`: any JSON object; `{"type": "json_schema", "json_schema": {"name",
  "schema", "strict"?}}`: JSON that validates against `schema`. JSON is written compactly with
  `", "` and `": "` separators (no free whitespace: a model cannot pad the answer with blank
  lines until `max_tokens`).
- Tool calls (forced, or started by the model under `"auto"`) and answers after a reasoning
  block: parallax/serving/tool_grammar.py builds those grammars.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from parallax.engine.sampling_params import MAX_GRAMMAR_CHARS
from parallax.serving.errors import APIError

logger = logging.getLogger(__name__)

# compact JSON, with the separators models write most (json.dumps' defaults)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class ResponseFormat:
    """A validated `response_format`; `grammar` is None for plain text."""

    type: str = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    grammar: str | None = None

    @property
    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer validates against (None: plain text)."""
        if self.type == "json_object":
            return {"type": "object"}
        return self.schema if self.type == "json_schema" else None

    def to_body(self) -> dict[str, Any] | None:
        """The `response_format` object this was parsed from, normalized (None: plain text)."""
        if self.type == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": self.name,
                                                            "schema": self.schema}}
        return {"type": self.type} if self.type != "text" else None


def _bad(message: str) -> APIError:
    return APIError(400, message)


def _json_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


@functools.lru_cache(maxsize=256)
def _grammar_error(grammar: str) -> str:
    """llguidance's complaint about `grammar` ("" when it compiles); agents repeat their
    schemas, so the answers are kept."""
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar)


def check_grammar(grammar: str, where: str) -> str:
    """`grammar` if llguidance compiles it; else a 400 naming `where`."""
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise _bad(f"'{where}' is too large: its grammar has {len(grammar)} characters, at most "
                   f"{MAX_GRAMMAR_CHARS} are accepted; use a smaller schema")
    error = _grammar_error(grammar)
    if error:
        raise _bad(f"'{where}' cannot be used to constrain the answer: {error}")
    return grammar


def parse_response_format(value: Any) -> ResponseFormat:
    """`response_format` (absent, text, json_object or json_schema) → its grammar; 400 naming
    `response_format` when it is malformed or its schema is invalid."""
    if value is None:
        return ResponseFormat()
    if not isinstance(value, dict):
        raise _bad("'response_format' must be an object like {\"type\": \"json_object\"}")
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise _bad(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, "
                   f"got {kind!r}")
    if kind == "text":
        return ResponseFormat()
    if kind == "json_object":
        grammar = check_grammar(_json_grammar({"type": "object"}), "response_format")
        return ResponseFormat("json_object", grammar=grammar)
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("'response_format.json_schema' must be an object with 'name' and 'schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise _bad("'response_format.json_schema.name' must be a non-empty string")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise _bad("'response_format.json_schema.strict' must be a boolean")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad("'response_format.json_schema.schema' must be a JSON schema object")
    try:
        grammar = _json_grammar(schema)
    except (ValueError, TypeError) as exc:
        raise _bad(f"'response_format.json_schema.schema' is not a valid JSON schema: "
                   f"{exc}") from None
    check_grammar(grammar, "response_format.json_schema.schema")
    return ResponseFormat("json_schema", name, schema, grammar)


def tokenizer_json(tokenizer: Any) -> str | None:
    """The `tokenizer.json` text of a fast tokenizer (None: not a fast one, no grammars)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        return backend.to_str()
    except Exception:  # noqa: BLE001 - a tokenizer that cannot serialise: no grammars
        return None


def grammar_vocab_json(tokenizer: Any) -> str | None:
    """`tokenizer_json` when llguidance can read it (None: this model cannot constrain
    decoding; forced calls and `response_format` are a 400, `"auto"` calls stay free)."""
    text = tokenizer_json(tokenizer)
    if text is None:
        return None
    import llguidance

    try:
        llguidance.LLTokenizer(text)
    except Exception as exc:  # noqa: BLE001 - e.g. a decoder llguidance does not know
        logger.warning("this tokenizer cannot constrain decoding: %s", exc)
        return None
    return text
