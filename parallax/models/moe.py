"""Mixture-of-experts pieces shared by the MoE families (Qwen3-MoE, GPT-OSS, MiniMax-M2).

All experts of a layer live in two 3-D weights, so a batch runs each *active* expert once on
all of its tokens: the token→expert assignments are sorted by expert, every expert multiplies
one contiguous slice of the gathered rows, and the weighted results are scattered back with a
single index_add. There is no per-token Python loop; the loop is over experts (at most E
iterations, usually fewer on decode batches), with one host sync for the group sizes.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# A per-expert checkpoint tensor, as our parameter name: layers.{i}.mlp.experts.{e}.{proj}.weight
EXPERT_NAME = re.compile(r"^(layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU on [N, 2I] laid out gate | up. Returns [N, I]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def group_by_expert(
    topk_ids: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Sort assignments by expert.

    topk_ids: [T, K]. Returns (order [T*K] indices into the flattened assignments, token index
    [T*K] of each sorted assignment, per-expert group sizes as a Python list of E ints).
    The sort is stable, so within an expert the tokens keep their order.
    """
    flat = topk_ids.reshape(-1)  # [T*K]
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()  # the one host sync
    return order, order // topk_ids.shape[1], counts


class FusedExperts(nn.Module):
    """E experts as gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I].

    The names and layouts equal transformers' own 3-D expert tensors for Qwen3-MoE and
    MiniMax-M2, so a checkpoint stored that way loads as is; per-expert checkpoint tensors
    load through `load_expert`.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        bias: bool = False,
        activation: Callable[[torch.Tensor], torch.Tensor] = silu_and_mul,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        if bias:
            self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        else:
            self.gate_up_proj_bias = self.down_proj_bias = None
        self.activation = activation
        self._loaded_parts: set[tuple[str, int]] = set()

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, H]; topk_ids, topk_weights: [T, K]. Returns sum_k w_k * expert_k(x): [T, H]."""
        order, token_of, counts = group_by_expert(topk_ids, self.num_experts)
        rows = x[token_of]  # [T*K, H], grouped by expert
        out = torch.empty_like(rows)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            gate_up_bias = None if self.gate_up_proj_bias is None else self.gate_up_proj_bias[expert]
            down_bias = None if self.down_proj_bias is None else self.down_proj_bias[expert]
            hidden = F.linear(rows[start:end], self.gate_up_proj[expert], gate_up_bias)
            out[start:end] = F.linear(self.activation(hidden), self.down_proj[expert], down_bias)
            start = end
        weights = topk_weights.reshape(-1)[order].unsqueeze(1)  # [T*K, 1]
        weighted = (out * weights).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, weighted)

    # ---- weights -------------------------------------------------------------------------

    def load_expert(self, expert: int, part: str, tensor: torch.Tensor) -> set[str]:
        """Copy one expert's gate ([I, H]), up ([I, H]) or down ([H, I]) weight.

        Returns the names of our parameters that are now completely filled (for the loader's
        completeness check): a fused weight counts only once every expert's part arrived.
        """
        size = self.intermediate_size
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is outside this layer's {self.num_experts}")
        targets = {
            "gate": self.gate_up_proj.data[expert, :size],
            "up": self.gate_up_proj.data[expert, size:],
            "down": self.down_proj.data[expert],
        }
        target = targets[part]
        if target.shape != tensor.shape:
            raise ValueError(
                f"expert {expert} {part} weight has shape {tuple(tensor.shape)}, the model "
                f"expects {tuple(target.shape)}: config and weights disagree"
            )
        target.copy_(tensor)
        self._loaded_parts.add((part, expert))
        done = set()
        if all(("gate", e) in self._loaded_parts and ("up", e) in self._loaded_parts
               for e in range(self.num_experts)):
            done.add("gate_up_proj")
        if all(("down", e) in self._loaded_parts for e in range(self.num_experts)):
            done.add("down_proj")
        return done


class ExpertLoaderMixin:
    """Routes per-expert checkpoint tensors into FusedExperts; mixed into a family class.

    `expert_parts` maps the checkpoint's projection name to gate / up / down.
    """

    expert_parts: dict[str, str] = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

    def load_one(self, params: dict, target: str, tensor: torch.Tensor) -> set[str]:
        match = EXPERT_NAME.match(target)
        if match and match.group(3) in self.expert_parts:
            experts = self.get_submodule(match.group(1))
            part = self.expert_parts[match.group(3)]
            done = experts.load_expert(int(match.group(2)), part, tensor)
            return {f"{match.group(1)}.{name}" for name in done}
        return super().load_one(params, target, tensor)
