"""Qwen3 (dense): the Llama decoder with a per-head RMSNorm on q and k before RoPE."""

from __future__ import annotations

import torch

from parallax.models.layers import RMSNorm
from parallax.models.llama import LlamaForCausalLM
from parallax.models.qwen2 import Qwen2Attention


class Qwen3Attention(Qwen2Attention):
    def __init__(self, config, layer_index: int, rotary) -> None:
        super().__init__(config, layer_index, rotary)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.head_dim, eps)
        self.k_norm = RMSNorm(self.head_dim, eps)

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_class = Qwen3Attention
