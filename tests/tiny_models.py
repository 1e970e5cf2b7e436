"""Tiny random-weight models saved by transformers, and helpers to run our shards on them."""

from __future__ import annotations

import torch

from parallax.engine.engine import Engine, EngineConfig
from parallax.engine.sampling_params import SamplingParams
from parallax.models.attention import AttentionMetadata, PrefillSpan

TINY = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5,
)


def tiny_config(model_type: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**TINY, **overrides}
    if model_type == "qwen3":
        kwargs.setdefault("head_dim", 16)
    return AutoConfig.for_model(model_type, **kwargs)


def save_tiny_model(tmp_path, model_type: str, seed: int = 0, **overrides):
    """Random-weight HF model saved as safetensors in tmp_path; returns (path, hf_model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so they are tested too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / model_type
    model.save_pretrained(path, safe_serialization=True)
    return str(path), model


def attach_cache(model, num_slots: int = 1024) -> None:
    for layer in model.attention_layers:
        shape = (num_slots, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = torch.zeros(shape)
        layer.v_cache = torch.zeros(shape)


@torch.inference_mode()
def prefill_hidden(model, inputs: torch.Tensor) -> torch.Tensor:
    """One sequence, whole prompt, slots 0..T-1. inputs: ids [T] or hidden [T, H]."""
    num_tokens = inputs.shape[0]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens), prefills=[PrefillSpan(0, num_tokens, num_tokens, None)]
    )
    return model(inputs, torch.arange(num_tokens), meta)


def greedy_tokens(model, prompts: list[list[int]], max_tokens: int, **config) -> list[list[int]]:
    """Run prompts through an Engine (all at once) and collect greedy tokens, EOS ignored."""
    engine = Engine(model, EngineConfig(kv_memory_bytes=config.pop("kv", 8 * 2**20), **config))
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for _ in range(10_000):
        if not engine.has_work():
            break
        for o in engine.step():
            out[o.request_id].append(o.token_id)
    return [out[str(i)] for i in range(len(prompts))]
