"""GPT-OSS (gpt-oss-20b / 120b): attention sinks, alternating sliding / full attention, YaRN,
and a biased MoE with a clamped SwiGLU. Expert weights load from bf16 checkpoints (transformers'
`save_pretrained`) or from the published MXFP4 ones (`*_blocks` + `*_scales`), which stay MXFP4
in memory: repacked once per expert into ggml's MXFP4 blocks (same bytes) and multiplied by
parallax.models.quant's kernels, one active expert at a time. Biases, attention, router, norms,
embeddings and LM head follow the shard's dtype.

As transformers 5.24 computes it:
- q/k/v/o carry biases (`attention_bias`); every head has a learned sink logit that joins the
  softmax denominator; `layer_types` picks a window of `sliding_window` keys or full attention;
- router: logits = x W^T + b, top-k on the logits, softmax over the k chosen logits;
- expert: gate_up = x W + b, split interleaved (gate = even columns, up = odd ones),
  gate clamped above at `swiglu_limit`, up clamped to ±limit,
  out = ((up + 1) * gate * sigmoid(alpha * gate)) W_down + b_down;
- RMSNorm multiplies its fp32 weight before casting back (not after, as Llama does).
We de-interleave gate/up at load (gate rows, then up rows) so the forward is a plain chunk.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from parallax.models.layers import RMSNorm
from parallax.models.llama import Attention, LlamaForCausalLM
from parallax.models.moe import FusedExperts
from parallax.models.mxfp4 import dequantize_mxfp4, repack_mxfp4
from parallax.models.quant.formats import QT

# layers.{i}.mlp.experts.{gate_up_proj|down_proj}[_bias|_blocks|_scales]
EXPERT_TENSOR = re.compile(
    r"^(layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?$"
)


EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


def mxfp4_experts(config) -> bool:
    """Whether the config says the experts are MXFP4 (the published checkpoints'
    `quantization_config`): sizing counts them packed, and the shard is built that way."""
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else \
        getattr(quant, "quant_method", None)
    return str(method).lower() == "mxfp4"


class GptOssRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(dtype)


class GptOssAttention(Attention):
    def __init__(self, config, layer_index: int, rotary) -> None:
        super().__init__(config, layer_index, rotary)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))


def clamped_swiglu(alpha: float, limit: float):
    """gpt-oss' expert activation on [N, 2I] laid out gate | up. Returns [N, I]."""

    def activation(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return activation


class GptOssSparseBlock(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_local_experts, bias=True)
        self.experts = FusedExperts(
            config.num_local_experts, config.hidden_size, config.intermediate_size, bias=True,
            activation=clamped_swiglu(config.swiglu_alpha, config.swiglu_limit),
        )
        if mxfp4_experts(config):
            for proj in EXPERT_PROJECTIONS:
                self.experts.set_weight_type(proj, QT.MXFP4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)  # [T, E]
        top_logits, ids = torch.topk(logits, self.top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1, dtype=top_logits.dtype)
        return self.experts(x, ids, weights)


def deinterleave(rows: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """gate/up alternating along dim (size 2I) -> the I gate rows, then the I up rows."""
    pairs = rows.unflatten(dim, (-1, 2))  # [..., I, 2, ...]
    return torch.cat((pairs.select(dim + 1, 0), pairs.select(dim + 1, 1)), dim=dim)


class GptOssForCausalLM(LlamaForCausalLM):
    attention_class = GptOssAttention
    mlp_class = GptOssSparseBlock

    def __init__(self, config, start_layer: int, end_layer: int) -> None:
        super().__init__(config, start_layer, end_layer)
        eps = getattr(config, "rms_norm_eps", 1e-5)
        for layer in self.layers:
            layer.input_layernorm = GptOssRMSNorm(config.hidden_size, eps)
            layer.post_attention_layernorm = GptOssRMSNorm(config.hidden_size, eps)
        if self.is_last:
            self.norm = GptOssRMSNorm(config.hidden_size, eps)
        self._mxfp4_pending: dict[str, dict[str, torch.Tensor]] = {}

    def match_checkpoint(self, names: set[str]) -> None:
        """Hold each layer's expert weights the way the checkpoint stores them: MXFP4 where it
        has `*_blocks`, float otherwise (whatever the config said). Called on the meta-device
        shard before to_empty, so the other layout is never allocated."""
        for local, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.start_layer + local}.mlp.experts."
            for proj in EXPERT_PROJECTIONS:
                packed = f"{prefix}{proj}_blocks" in names
                layer.mlp.experts.set_weight_type(proj, QT.MXFP4 if packed else None)

    def load_one(self, params: dict, target: str, tensor: torch.Tensor) -> set[str]:
        match = EXPERT_TENSOR.match(target)
        if not match:
            return super().load_one(params, target, tensor)
        experts_path, proj, suffix = match.group(1), match.group(2), match.group(3) or ""
        if suffix in ("_blocks", "_scales"):
            # blocks and scales may arrive in any order (even from different files): pair them
            key = f"{experts_path}.{proj}"
            pending = self._mxfp4_pending.setdefault(key, {})
            pending[suffix] = tensor
            if len(pending) < 2:
                return set()
            del self._mxfp4_pending[key]
            return self._copy_mxfp4(experts_path, proj, pending["_blocks"], pending["_scales"])
        if suffix == "_bias":
            return self._copy_expert(experts_path, proj + "_bias", tensor)
        # transformers' unquantized layout is [E, in, out]
        return self._copy_expert(experts_path, proj, tensor.transpose(1, 2))

    def _copy_expert(self, experts_path: str, name: str, tensor: torch.Tensor) -> set[str]:
        """Copy a whole-layer expert tensor ([E, out] or [E, out, in]) into our parameter."""
        param = getattr(self.get_submodule(experts_path), name)
        if param is None:
            raise ValueError(f"{experts_path}.{name} was built for MXFP4 blocks, the checkpoint "
                             "has float weights: load it through parallax.models.loader, which "
                             "matches the layout to the checkpoint")
        if name.startswith("gate_up_proj"):
            tensor = deinterleave(tensor)
        if param.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor for {experts_path}.{name} gives {tuple(tensor.shape)} as "
                f"[experts, out, in], the model expects {tuple(param.shape)}: config and "
                "weights disagree"
            )
        param.data.copy_(tensor)
        return {f"{experts_path}.{name}"}

    def _copy_mxfp4(
        self, experts_path: str, proj: str, blocks: torch.Tensor, scales: torch.Tensor
    ) -> set[str]:
        """Repack (or, for float experts, dequantize) one expert at a time straight into our
        parameter, so a layer's experts never exist twice in memory. blocks [E, out, in/32, 16],
        scales [E, out, in/32] already have our [E, out, in] orientation."""
        experts = self.get_submodule(experts_path)
        packed = proj in experts.quant_types
        name = f"{proj}_packed" if packed else proj
        param = getattr(experts, name)
        num_experts, (rows, cols) = experts.num_experts, experts.shapes[proj]
        if blocks.shape[:3] != (num_experts, rows, cols // 32) or cols % 32:
            raise ValueError(
                f"MXFP4 blocks for {experts_path}.{proj} have shape {tuple(blocks.shape)}, "
                f"which does not dequantize to the model's {(num_experts, rows, cols)}"
            )
        for expert in range(num_experts):
            if packed:  # [out, in/32 * 17] bytes
                weight = repack_mxfp4(blocks[expert], scales[expert])
            else:  # [out, in]
                weight = dequantize_mxfp4(blocks[expert], scales[expert], param.dtype)
            if proj == "gate_up_proj":
                weight = deinterleave(weight, dim=0)  # whole rows move, packed or not
            param.data[expert].copy_(weight)
        return {f"{experts_path}.{name}"}
