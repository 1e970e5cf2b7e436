"""Qwen2 / Qwen2.5: the Llama decoder with biases on q, k and v (none on o_proj)."""

from __future__ import annotations

from parallax.models.llama import Attention, LlamaForCausalLM


class Qwen2Attention(Attention):
    def qkv_bias(self, config) -> bool:
        return True

    def o_bias(self, config) -> bool:
        return False


class Qwen2ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen2Attention
