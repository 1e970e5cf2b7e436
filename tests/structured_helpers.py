"""A tiny byte-level BPE tokenizer and random-weight model for structured-output tests.

A random model samples close to uniformly among the tokens it is allowed: without the grammar
its output is never JSON, with it every answer must parse and validate (an adversarial
stand-in for a real model).
"""

from __future__ import annotations

import json
import random

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\n' + (message.content or '') + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS = "<|im_end|>"

# an object with an enum, a number and a list (bounded so a random model can finish it)
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "amount": {"type": "integer", "minimum": 0, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "bb", "ccc"]},
                 "maxItems": 3},
    },
    "required": ["color", "amount", "tags"],
    "additionalProperties": False,
}
# for the real SmolLM2: a fruit with an enum, a number and a list
SMOL_SCHEMA = {
    "type": "object",
    "properties": {
        "fruit": {"type": "string", "enum": ["apple", "banana", "cherry"]},
        "price": {"type": "number"},
        "colors": {"type": "array", "items": {"type": "string", "maxLength": 20},
                   "maxItems": 4},
    },
    "required": ["fruit", "price", "colors"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["red", "green", "blue", "Paris", "Rome", "weather", "name", "arguments", "tags",
             "color", "amount", "city", "days", "hello", "world", "the", "of", "tool_call"]
    lines = []
    for _ in range(400):
        obj = {rng.choice(words): rng.choice([rng.randint(0, 999), rng.choice(words),
                                              [rng.choice(words)], {"x": rng.random()}])
               for _ in range(rng.randint(1, 3))}
        lines.append(json.dumps(obj))
        lines.append(" ".join(rng.choice(words) for _ in range(8)))
        lines.append(f"<tool_call>\n{json.dumps({'name': rng.choice(words), 'arguments': obj})}"
                     "\n</tool_call>")
    return lines


def save_bpe_tokenizer(path, vocab_size: int = 400, special: tuple[str, ...] = (),
                       added: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer trained on JSON-ish text, with ChatML specials and template,
    saved into `path`; returns the transformers tokenizer. `special` / `added` are extra special
    tokens (dropped by `skip_special_tokens`) and added tokens (kept in decoded text), such as a
    family's tool-call markers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_corpus(), trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def save_random_model(tmp_path, seed: int = 0, special: tuple[str, ...] = (),
                      added: tuple[str, ...] = ()) -> tuple[str, object]:
    """A random-weight tiny llama with the BPE tokenizer (extra `special` / `added` tokens) in
    one directory; (path, tokenizer)."""
    from tiny_models import save_tiny_model

    tokenizer = save_bpe_tokenizer(tmp_path / "tokenizer", special=special, added=added)
    vocab = len(tokenizer)
    path, _ = save_tiny_model(tmp_path, "llama", seed=seed, vocab_size=vocab,
                              max_position_embeddings=2048,  # room for a tools prompt
                              eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
                              bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    tokenizer.save_pretrained(path)
    return path, tokenizer


def check_schema(value, schema: dict) -> None:
    """Raise when `value` does not validate against `schema`."""
    import jsonschema

    jsonschema.validate(value, schema)


def assert_fruit_json_always_validates(client, count: int = 20, workers: int = 20) -> None:
    """`count` sampled SmolLM2 answers (temperature 1.0, max_tokens 160) under SMOL_SCHEMA,
    sent `workers` at a time through an openai client: each ends with `stop` and validates."""
    from concurrent.futures import ThreadPoolExecutor

    response_format = {"type": "json_schema",
                       "json_schema": {"name": "fruit", "schema": SMOL_SCHEMA}}

    def ask(seed: int):
        return client.chat.completions.create(
            model="default", temperature=1.0, seed=seed, max_tokens=160,
            messages=[{"role": "user", "content": "Describe a fruit you like as JSON "
                                                  "with its name, price and colors."}],
            response_format=response_format)

    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(ask, range(count)))
    for answer in answers:
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        check_schema(json.loads(answer.choices[0].message.content), SMOL_SCHEMA)


# ---------------------------------------------------------------- engine runs


def make_engine(model, tokenizer, **config):
    """An engine over `model` whose last stage constrains with `tokenizer`'s vocabulary."""
    from parallax.engine.engine import Engine, EngineConfig
    from parallax.serving.structured import tokenizer_json

    engine = Engine(model, EngineConfig(kv_memory_bytes=config.pop("kv", 4 * 2**20), **config),
                    [tokenizer.eos_token_id])
    engine.set_grammar_vocab(tokenizer_json(tokenizer))
    return engine


def prompt_ids(tokenizer, text: str = "Give me an order as JSON.") -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(rendered, add_special_tokens=False)


def run(engine, requests: dict[str, tuple[list[int], object]],
        resumed: dict[str, int] | None = None) -> dict[str, tuple[list[int], str | None]]:
    """Add all requests, step until done; {rid: (tokens, finish_reason)}."""
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params, (resumed or {}).get(rid, 0))
    out = {rid: ([], None) for rid in requests}
    for _ in range(2000):
        if not engine.has_work():
            break
        for o in engine.step():
            if o.token_id is not None:
                out[o.request_id][0].append(o.token_id)
            if o.finished:
                out[o.request_id] = (out[o.request_id][0], o.finish_reason)
    return out


def answer_text(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
