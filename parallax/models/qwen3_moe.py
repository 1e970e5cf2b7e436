"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3 attention + sparse MoE feed-forward.

Router as transformers computes it: softmax over all experts in fp32, top-k, optionally
renormalised over the chosen k (`norm_topk_prob`), cast back to the hidden dtype. No shared
expert. Layers listed in `mlp_only_layers`, or off the `decoder_sparse_step` grid, keep a dense
MLP of `intermediate_size`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from parallax.models.llama import MLP, LlamaForCausalLM
from parallax.models.moe import ExpertLoaderMixin, FusedExperts
from parallax.models.qwen3 import Qwen3Attention


def is_sparse_layer(config, layer_index: int) -> bool:
    """Whether the layer's feed-forward is the MoE block (transformers' rule)."""
    num_experts = getattr(config, "num_experts", 0) or 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (
        layer_index not in (getattr(config, "mlp_only_layers", None) or [])
        and num_experts > 0
        and (layer_index + 1) % step == 0
    )


class Qwen3MoeSparseBlock(nn.Module):
    """Router `gate` [E, H] + experts; checkpoint names mlp.gate.weight, mlp.experts.{e}.*."""

    def __init__(self, config) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = FusedExperts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (top-k expert ids [T, K], weights [T, K] in x's dtype)."""
        logits = self.gate(x)  # [T, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(logits.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(x)
        return self.experts(x, ids, weights)


def qwen3_moe_mlp(config, layer_index: int) -> nn.Module:
    """The layer's feed-forward: the sparse block, or a dense MLP on mlp-only layers."""
    if is_sparse_layer(config, layer_index):
        return Qwen3MoeSparseBlock(config)
    return MLP(config, layer_index)


class Qwen3MoeForCausalLM(ExpertLoaderMixin, LlamaForCausalLM):
    attention_class = Qwen3Attention
    mlp_class = staticmethod(qwen3_moe_mlp)
