"""MiniMax-M2: full attention with q/k RMSNorm over *all* heads and partial RoPE, sigmoid MoE.

As transformers 5.24 computes it:
- q_norm has num_heads * head_dim weights and k_norm num_kv_heads * head_dim: each normalises
  the whole projection (all heads together) before the split into heads and RoPE;
- RoPE rotates the first `partial_rotary_factor * head_dim` channels (the checkpoints'
  `rotary_dim`), rotate-half layout inside that slice;
- router: sigmoid(logits) in fp32; the top-k experts are chosen on sigmoid + the per-expert
  `e_score_correction_bias`, but weighted by the plain sigmoid scores renormalised over the k.
Checkpoint names: block_sparse_moe.{gate.weight, e_score_correction_bias, experts.{e}.w1/w2/w3}.
"""

from __future__ import annotations

import torch
from torch import nn

from parallax.models.layers import RMSNorm, RotaryEmbedding, rope_config_parameters
from parallax.models.llama import Attention, LlamaForCausalLM, head_dim_of
from parallax.models.moe import ExpertLoaderMixin, FusedExperts


def partial_rotary_dim(config) -> int:
    """Rotary channels per head: rope_parameters' factor (v5), else the config attribute."""
    factor = rope_config_parameters(config).get("partial_rotary_factor")
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim_of(config) * factor)


class MiniMaxM2Attention(Attention):
    def __init__(self, config, layer_index: int, rotary) -> None:
        super().__init__(config, layer_index, rotary)
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.q_norm = RMSNorm(self.num_heads * self.head_dim, eps)
        self.k_norm = RMSNorm(self.num_kv_heads * self.head_dim, eps)

    def qkv_bias(self, config) -> bool:
        return False

    def o_bias(self, config) -> bool:
        return False

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [T, H, D] -> [T, H*D] for the norm over all heads, then back
        q = self.q_norm(q.flatten(1)).view_as(q)
        k = self.k_norm(k.flatten(1)).view_as(k)
        return q, k


class MiniMaxM2SparseBlock(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        num_experts = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts))
        self.experts = FusedExperts(num_experts, config.hidden_size, config.intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (expert ids [T, K], fp32 weights [T, K])."""
        scores = torch.sigmoid(self.gate(x).float())  # [T, E]
        choice = scores + self.e_score_correction_bias
        ids = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, ids)
        return ids, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return self.experts(x, ids, weights)


class MiniMaxM2ForCausalLM(ExpertLoaderMixin, LlamaForCausalLM):
    attention_class = MiniMaxM2Attention
    mlp_class = MiniMaxM2SparseBlock
    expert_parts = {"w1": "gate", "w3": "up", "w2": "down",
                    "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    @staticmethod
    def make_rotary(config) -> RotaryEmbedding:
        return RotaryEmbedding(config, head_dim_of(config), partial_rotary_dim(config))

    def checkpoint_to_param_names(self, name: str) -> list[str]:
        # the published checkpoints call the MoE block `block_sparse_moe`; we call it `mlp`
        return super().checkpoint_to_param_names(name.replace(".block_sparse_moe.", ".mlp."))
