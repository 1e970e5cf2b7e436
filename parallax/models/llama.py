"""Llama family (Llama 2/3, Mistral, SmolLM2) and the dense decoder other families extend.

A shard holds decoder layers [start_layer, end_layer) of num_hidden_layers; the embedding only
when start_layer == 0, the final norm and LM head only when end_layer == num_hidden_layers.
q/k/v and gate/up are fused into one matmul each: fewer kernel launches per decode step.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from parallax.models import fused_ops
from parallax.models.attention import AttentionMetadata, paged_attention
from parallax.models.decode_plan import decode_plan_for
from parallax.models.layers import RMSNorm, RotaryEmbedding, rope_config_parameters

LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class PackedLinear(nn.Linear):
    """A Linear whose output rows are several checkpoint tensors stacked (q|k|v, gate|up)."""

    def __init__(self, in_features: int, shard_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias)
        self.shard_offsets = [sum(shard_sizes[:i]) for i in range(len(shard_sizes))]
        self.shard_sizes = shard_sizes

    def load_shard(self, param_name: str, shard_index: int, tensor: torch.Tensor) -> None:
        offset, size = self.shard_offsets[shard_index], self.shard_sizes[shard_index]
        target = getattr(self, param_name)
        if tensor.shape[0] != size:
            raise ValueError(f"expected {size} rows for packed shard, got {tuple(tensor.shape)}")
        target.data[offset : offset + size].copy_(tensor)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_index: int) -> int | None:
    """The layer's attention window, or None for full attention."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_index] == "sliding_attention" else None
    # Mistral-style configs apply the window to every layer; Qwen2 gates it by a flag.
    return window if getattr(config, "use_sliding_window", True) else None


class Attention(nn.Module):
    def __init__(self, config, layer_index: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.qkv_proj = PackedLinear(
            config.hidden_size,
            [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2,
            bias=self.qkv_bias(config),
        )
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, config.hidden_size, bias=self.o_bias(config)
        )
        self.rotary = rotary
        self.scale = self.head_dim**-0.5
        self.sliding_window = sliding_window_of(config, layer_index)
        self.sinks: torch.Tensor | None = None  # per-head attention-sink logits (gpt-oss)
        self.k_cache: torch.Tensor | None = None  # [num_slots, KVH, D], set by the runner
        self.v_cache: torch.Tensor | None = None

    def qkv_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def o_bias(self, config) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook for per-head q/k norms (Qwen3); identity here."""
        return q, k

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(hidden).view(num_tokens, heads + 2 * kv_heads, self.head_dim)
        if type(self).project_qk is Attention.project_qk:
            # no q/k norms: q and k are adjacent heads of one buffer, rotated in one pass
            rotary, qk = self.rotary, qkv[:, : heads + kv_heads]
            if not fused_ops.rope_(qk, positions, rotary.cos, rotary.sin, rotary.rotary_dim):
                qk = rotary.rotate(qk, *rotary.step_tables(positions))
            q, k = qk.split([heads, kv_heads], dim=1)
            v = qkv[:, heads + kv_heads :]
        else:
            q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
            q, k = self.rotary(positions, *self.project_qk(q, k))
        out = paged_attention(
            q, k, v, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window,
            sinks=self.sinks,
        )
        return self.o_proj(out.view(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config, layer_index: int) -> None:
        super().__init__()
        size = config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = PackedLinear(config.hidden_size, [size, size], bias=bias)
        self.down_proj = nn.Linear(size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        hidden = fused_ops.silu_mul(gate_up)
        if hidden is None:
            gate, up = gate_up.chunk(2, dim=-1)
            hidden = F.silu(gate) * up
        return self.down_proj(hidden)


class DecoderLayer(nn.Module):
    def __init__(self, family: type[LlamaForCausalLM], config, layer_index: int, rotary) -> None:
        super().__init__()
        eps = getattr(config, "rms_norm_eps", 1e-6)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.self_attn = family.attention_class(config, layer_index, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.mlp = family.mlp_class(config, layer_index)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden), meta)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class LlamaForCausalLM(nn.Module):
    """Decoder layers [start_layer, end_layer) of a Llama-style model, plus ends it owns."""

    attention_class: type[nn.Module] = Attention
    mlp_class: type[nn.Module] = MLP
    # checkpoint name fragment -> (our packed module attribute, shard index)
    packed_modules = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config, start_layer: int, end_layer: int) -> None:
        super().__init__()
        num_layers = config.num_hidden_layers
        if not 0 <= start_layer < end_layer <= num_layers:
            raise ValueError(
                f"layer range [{start_layer}, {end_layer}) is outside the model's "
                f"{num_layers} layers; use 0 <= start < end <= {num_layers}"
            )
        self.config = config
        self.start_layer, self.end_layer = start_layer, end_layer
        self.is_first = start_layer == 0
        self.is_last = end_layer == num_layers
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.rotary = self.make_rotary(config)
        if self.is_first:
            self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(type(self), config, i, self.rotary) for i in range(start_layer, end_layer)
        )
        if self.is_last:
            self.norm = RMSNorm(config.hidden_size, getattr(config, "rms_norm_eps", 1e-6))
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            if self.is_first and self.tie_word_embeddings:
                self.lm_head.weight = self.embed_tokens.weight

    @staticmethod
    def make_rotary(config) -> RotaryEmbedding:
        # transformers 5 keeps partial_rotary_factor in rope_parameters (the attribute is None)
        factor = rope_config_parameters(config).get("partial_rotary_factor")
        if factor is None:
            factor = getattr(config, "partial_rotary_factor", None) or 1.0
        rotary_dim = int(head_dim_of(config) * factor)
        return RotaryEmbedding(config, head_dim_of(config), rotary_dim)

    @property
    def attention_layers(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.layers]

    def forward(
        self, inputs: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """inputs: token ids [T] on the first stage, hidden states [T, hidden] elsewhere.

        Returns hidden states [T, hidden] before the final norm.
        """
        hidden = self.embed_tokens(inputs) if self.is_first else inputs
        plan = decode_plan_for(self, hidden, positions, meta)
        if plan is not None:
            return plan.run(hidden, positions, meta)
        for layer in self.layers:
            hidden = layer(positions, hidden, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on the rows that need a next token. Returns fp32 [N, vocab]."""
        return self.lm_head(self.norm(hidden)).float()

    # ---- weights -------------------------------------------------------------------------

    @classmethod
    def owns_tensor(cls, name: str, start_layer: int, end_layer: int, config) -> bool:
        """Whether a checkpoint tensor (HF name) belongs to the shard [start_layer, end_layer)."""
        match = LAYER_NAME.match(name)
        if match:
            return start_layer <= int(match.group(1)) < end_layer
        is_first, is_last = start_layer == 0, end_layer == config.num_hidden_layers
        if name.startswith("model.embed_tokens."):
            tied = bool(getattr(config, "tie_word_embeddings", False))
            return is_first or (is_last and tied)
        if name.startswith(("model.norm.", "lm_head.")):
            return is_last
        return False

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors into the shard; returns the parameter names filled."""
        params = dict(self.named_parameters(remove_duplicate=False))
        loaded: set[str] = set()
        for name, tensor in weights:
            for target in self.checkpoint_to_param_names(name):
                loaded |= self.load_one(params, target, tensor)
        return loaded

    def checkpoint_to_param_names(self, name: str) -> list[str]:
        """Our parameter names for one checkpoint tensor (layer index made local)."""
        match = LAYER_NAME.match(name)
        if match:
            index = int(match.group(1))
            if not self.start_layer <= index < self.end_layer:
                return []
            return [f"layers.{index - self.start_layer}.{match.group(2)}"]
        if name == "model.embed_tokens.weight":
            targets = ["embed_tokens.weight"] if self.is_first else []
            if self.is_last and self.tie_word_embeddings:
                targets.append("lm_head.weight")
            return targets
        if name.startswith("model.norm.") and self.is_last:
            return [name.removeprefix("model.")]
        if name.startswith("lm_head.") and self.is_last:
            return [name]
        return []

    def locate(self, target: str) -> tuple[str, str, int | None]:
        """(module path, parameter name, shard index in a fused module or None) of a target."""
        module_path, _, param_name = target.rpartition(".")
        parent_path, _, leaf = module_path.rpartition(".")
        if leaf in self.packed_modules:
            packed_name, shard_index = self.packed_modules[leaf]
            return (f"{parent_path}.{packed_name}" if parent_path else packed_name, param_name,
                    shard_index)
        return module_path, param_name, None

    def load_one(self, params: dict, target: str, tensor: torch.Tensor) -> set[str]:
        packed_path, param_name, shard_index = self.locate(target)
        if shard_index is not None:
            module = self.get_submodule(packed_path)
            module.load_shard(param_name, shard_index, tensor.to(getattr(module, param_name).dtype))
            return {f"{packed_path}.{param_name}"}
        if target not in params:
            return set()  # e.g. rotary inv_freq or tensors of a feature we do not use
        param = params[target]
        if param.shape != tensor.shape:
            raise ValueError(
                f"checkpoint tensor for {target} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(param.shape)}: config and weights disagree"
            )
        param.data.copy_(tensor.to(param.dtype))
        return {target}
