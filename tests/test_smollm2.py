"""The built-in SmolLM2-135M-Instruct GGUF through our engine equals transformers in fp32."""

from __future__ import annotations

import os

import pytest
import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.hub import builtin_gguf_path
from parallax.models.loader import load_shard, load_tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain recursion in one sentence.",
]


@pytest.fixture(scope="module", autouse=True)
def dequantized_weights():
    """Exact equality with transformers needs its fp32 weights: the dequantizing GGUF path
    (the packed path is compared with this one in test_gguf_packed.py)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PARALLAX_GGUF_DEQUANTIZE", "1")
        yield


@pytest.fixture(scope="module")
def gguf():
    path = builtin_gguf_path()
    tokenizer = load_tokenizer(path)
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                           add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for p in PROMPTS
    ]
    return path, tokenizer, prompts


@pytest.fixture(scope="module")
def hf_greedy(gguf):
    from transformers import AutoModelForCausalLM

    path, tokenizer, prompts = gguf
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).eval()
    outputs = []
    for prompt in prompts:
        generated = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                                   eos_token_id=tokenizer.eos_token_id, pad_token_id=2)
        outputs.append(generated[0, len(prompt):].tolist())
    return outputs


def run_engine(model, prompts, eos_id, one_at_a_time: bool):
    engine = Engine(model, EngineConfig(kv_memory_bytes=64 * 2**20), eos_token_ids=[eos_id])
    params = SamplingParams(temperature=0, max_tokens=32)
    out: dict[str, list[int]] = {}
    groups = [[i] for i in range(len(prompts))] if one_at_a_time else [list(range(len(prompts)))]
    for group in groups:
        for i in group:
            engine.add_request(str(i), prompts[i], params)
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).append(o.token_id)
    return [out[str(i)] for i in range(len(prompts))]


def test_gguf_fp32_greedy_equals_transformers(gguf, hf_greedy):
    path, tokenizer, prompts = gguf
    model = load_shard(path).model
    alone = run_engine(model, prompts, tokenizer.eos_token_id, one_at_a_time=True)
    assert alone == hf_greedy
    answer = tokenizer.decode(alone[0], skip_special_tokens=True)
    assert answer.startswith("The capital of France is Paris.")
    batched = run_engine(model, prompts, tokenizer.eos_token_id, one_at_a_time=False)
    assert batched == hf_greedy


def test_gguf_two_shards_equal_whole(gguf, hf_greedy):
    path, tokenizer, prompts = gguf
    first, last = load_shard(path, 0, 13).model, load_shard(path, 13, 30).model
    assert not hasattr(first, "lm_head") and last.lm_head.weight.shape == (49152, 576)
    head = Engine(first, EngineConfig(kv_memory_bytes=32 * 2**20))
    tail = Engine(last, EngineConfig(kv_memory_bytes=32 * 2**20),
                  eos_token_ids=[tokenizer.eos_token_id])
    params = SamplingParams(temperature=0, max_tokens=32)
    head.add_request("q", prompts[0], params)
    tokens, started = [], False
    for _ in range(200):
        for o in head.step():
            tail.add_hidden("q", o.token_ids, o.start_position, o.hidden,
                            None if started else params, len(prompts[0]))
            started = True
        for o in tail.step():
            tokens.append(o.token_id)
            head.append_token("q", o.token_id, o.finished, o.finish_reason)
        if not head.has_work() and not tail.has_work():
            break
    assert tokens == hf_greedy[0]
