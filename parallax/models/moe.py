"""Mixture-of-experts pieces shared by the MoE families (Qwen3-MoE, GPT-OSS, MiniMax-M2).

All experts of a layer live in two 3-D weights, so a batch runs each *active* expert once on
all of its tokens: the token→expert assignments are sorted by expert, every expert multiplies
one contiguous slice of the gathered rows, and adds its weighted results into their tokens'
rows with an index_add. There is no per-token Python loop; the loop is over experts (at most E
iterations, usually fewer on decode batches), with one host sync for the group sizes.

An expert weight may also stay quantized (gpt-oss' MXFP4 experts, see
`FusedExperts.set_weight_type`): it is then held as packed rows (`<proj>_packed`, uint8
[E, out, row_bytes]) and each active expert multiplies its own rows with
parallax.models.quant's kernels; no float copy of the experts exists.

With PARALLAX_PACK_CPU_EXPERTS=1, CPU expert matmuls run on oneDNN-packed copies of the weights
(see `pack_for_onednn`): a decode step gives each expert only a few rows, and a plain matmul
re-packs the whole weight on every call, which costs more than the multiply itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from parallax.models.quant import native
from parallax.models.quant.formats import QT, row_bytes
from parallax.models.quant.packed import (
    PackedWeight,
    activation_int8_default,
    native_for,
    packed_matmul,
)

# Whether CPU forwards keep oneDNN-packed copies of the expert weights: about 2x faster expert
# matmuls on decode-sized groups (1.2x at 256 rows), for a second copy of the expert weights in
# memory. parallax.models.sizing's layer estimates (what the scheduler allocates by) do not
# count that copy, so it is opt-in: PARALLAX_PACK_CPU_EXPERTS=1 where memory has room.
PACK_CPU_EXPERTS = os.environ.get("PARALLAX_PACK_CPU_EXPERTS", "0") == "1"

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


def can_pack_for_onednn(weight: torch.Tensor) -> bool:
    """Whether oneDNN can pack this weight for `_linear_pointwise` (CPU, fp32 or bf16)."""
    return (
        PACK_CPU_EXPERTS
        and weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


def pack_for_onednn(weights: torch.Tensor) -> list[torch.Tensor]:
    """[E, out, in] -> E opaque oneDNN tensors in the blocked layout its matmul reads directly.

    Packing once here is what a plain F.linear does on every call (for every expert, every
    step); with 4 rows per expert that re-packing is most of the matmul's time.
    """
    with torch.no_grad():
        return [torch.ops.mkldnn._reorder_linear_weight(w.detach(), None) for w in weights]


def _packed_linear(rows: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear on a weight packed by `pack_for_onednn`."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def _row(bias: torch.Tensor | None, expert: int) -> torch.Tensor | None:
    return None if bias is None else bias[expert]


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
        # projection -> (out, in) of one expert; projection -> quantized type, if packed
        self.shapes = {"gate_up_proj": (2 * intermediate_size, hidden_size),
                       "down_proj": (hidden_size, intermediate_size)}
        self.quant_types: dict[str, QT] = {}
        # per packed projection: E (PackedWeight view, native kernels or None), made lazily
        self._quantized: dict[str, list[tuple[PackedWeight, native.NativeKernels | None]]] = {}
        # packed experts below packed.gemm_min_rows rows: int8 activations (set_activation_int8)
        self.activation_int8 = activation_int8_default()
        self._loaded_parts: set[tuple[str, int]] = set()
        # oneDNN-packed (gate_up, down) per expert, and the weights' state they were made from
        self._packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
        self._packed_key: tuple | None = None

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """x: [T, H]; topk_ids, topk_weights: [T, K]. Returns sum_k w_k * expert_k(x): [T, H]."""
        order, token_of, counts = group_by_expert(topk_ids, self.num_experts)
        rows = x[token_of]  # [T*K, H], grouped by expert
        weights = topk_weights.reshape(-1)[order].unsqueeze(1)  # [T*K, 1], same order
        # a token's K expert outputs add up in fp32, whatever x's dtype: one rounding at the end
        # (as transformers' sum over K), not one per expert
        total = torch.zeros(x.shape, dtype=torch.float32, device=x.device)  # [T, H]
        onednn = self._packed_weights()
        gate_up = self._expert_linear("gate_up_proj", onednn)
        down = self._expert_linear("down_proj", onednn)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            end = start + count
            hidden = self.activation(gate_up(rows[start:end], expert))
            out = down(hidden, expert) * weights[start:end]
            # scattered as each expert finishes: no [T*K, H] buffer to copy into and weight
            total.index_add_(0, token_of[start:end], out.float())
            start = end
        return total.to(x.dtype)

    def _expert_linear(self, proj: str, onednn: tuple | None
                       ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """(rows, expert) -> rows @ W[expert]^T + b[expert] in rows' dtype, for one projection:
        on its quantized rows, its oneDNN-packed copy (`onednn`) or the plain weight."""
        bias = getattr(self, f"{proj}_bias")
        if proj in self.quant_types:
            experts = self._quantized_experts(proj)

            def quantized(rows: torch.Tensor, expert: int) -> torch.Tensor:
                out = packed_matmul(rows, *experts[expert], self.activation_int8)  # fp32
                if bias is not None:
                    out.add_(bias[expert])
                return out.to(rows.dtype)

            return quantized
        index = 0 if proj == "gate_up_proj" else 1
        weight = onednn[index] if onednn is not None else getattr(self, proj)
        linear = _packed_linear if onednn is not None else F.linear
        return lambda rows, expert: linear(rows, weight[expert], _row(bias, expert))

    def _quantized_experts(self, proj: str
                           ) -> list[tuple[PackedWeight, native.NativeKernels | None]]:
        """Per expert: its packed rows and the native kernels that multiply them (or None: the
        torch path). Made once; `.to()` and `set_weight_type` drop it."""
        if proj not in self._quantized:
            data = getattr(self, f"{proj}_packed").data
            lib = native.kernels()
            weights = [PackedWeight(rows, self.quant_types[proj], self.shapes[proj][1])
                       for rows in data]
            self._quantized[proj] = [(w, lib if native_for(lib, w) else None) for w in weights]
        return self._quantized[proj]

    def _apply(self, fn, recurse=True):
        # to_empty / .to(device) replace the packed rows: the cached views must follow
        result = super()._apply(fn, recurse)
        self._quantized = {}
        return result

    def kernel_paths(self) -> list[str]:
        """Per quantized projection: "<type>:native-<isa>" or "<type>:torch" (logs, /health)."""
        paths = []
        for proj, qtype in sorted(self.quant_types.items()):
            lib = self._quantized_experts(proj)[0][1]
            int8 = lib is not None and self.activation_int8 and lib.supports_q8(
                qtype, self.shapes[proj][1])
            paths.append(f"{qtype.name}:" + (f"native-{lib.variant}" if lib else "torch")
                         + ("-int8" if int8 else ""))
        return paths

    def _packed_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
        """The oneDNN-packed weights, (re)made when the weights changed; None off CPU and
        where autograd records (it cannot see through the packed copies).

        Loaders write through `.data` before the first forward; later in-place edits (under
        no_grad), `.to()` and new `.data` show in the key, so they repack.
        """
        if (torch.is_grad_enabled() or self.quant_types
                or not can_pack_for_onednn(self.gate_up_proj)):
            return None
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in (self.gate_up_proj, self.down_proj))
        if key != self._packed_key:
            self._packed = (pack_for_onednn(self.gate_up_proj), pack_for_onednn(self.down_proj))
            self._packed_key = key
        return self._packed

    # ---- weights -------------------------------------------------------------------------

    def set_weight_type(self, proj: str, qtype: QT | None) -> None:
        """Hold `proj` ("gate_up_proj" / "down_proj") as float [E, out, in] (qtype None) or as
        packed rows of `qtype` in `<proj>_packed`: uint8 [E, out, row_bytes] (a parameter
        without grad, so the loader's completeness check sees it). Call it on the meta-device
        model, before to_empty: the layout not chosen is never allocated."""
        experts, (rows, cols) = self.num_experts, self.shapes[proj]
        device = next(self.parameters()).device  # meta while a shard is being built
        packed_name = f"{proj}_packed"
        if qtype is None:
            if proj in self.quant_types:
                del self.quant_types[proj]
                delattr(self, packed_name)
                setattr(self, proj, nn.Parameter(torch.empty(experts, rows, cols, device=device)))
        else:
            qtype = QT(qtype)
            data = torch.empty(experts, rows, row_bytes(qtype, cols), dtype=torch.uint8,
                               device=device)
            setattr(self, proj, None)
            setattr(self, packed_name, nn.Parameter(data, requires_grad=False))
            self.quant_types[proj] = qtype
        self._quantized = {}

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
        self._packed_key = None  # `.data` writes leave no trace in the key: repack
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
