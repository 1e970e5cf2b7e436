"""A pure decode step of a Llama-style shard in one native call (pq_decode_layers).

At batch 1 a layer's torch modules spent about as long in Python and op dispatch as the packed
matmuls took to stream the weights. When every layer of the shard is the plain decoder
(RMSNorm, q|k|v with optional bias and Qwen3's per-head q/k norms, full-attention rope, paged
attention, o, SiLU-gated MLP) with all weights packed for the native kernels, fp32 activations
and an fp32 KV cache, a step whose rows are all decodes runs through `DecodePlan.run`: the layers
are described once as C structs pointing into the module's own tensors, and the C loop runs
them in the modules' order, each matmul on the fused kernel or, from pq_gemm_min_rows rows on,
the blocked GEMM. A library without the blocked GEMM (AVX-512, portable) takes batches of
fewer than packed.GEMM_MIN_ROWS rows only: larger ones go to the modules' tile + BLAS.
Anything else (prefill chunks, sliding windows, sinks, MoE, float weights, bf16) takes the modules, which stay the
reference the tests compare this path with. `PARALLAX_FUSED_DECODE=0` keeps every step on the
modules.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref

import torch
from torch import nn

from parallax.models import fused_ops
from parallax.models.attention import AttentionMetadata
from parallax.models.layers import RMSNorm
from parallax.models.quant.packed import GEMM_MIN_ROWS, PackedLinear

logger = logging.getLogger(__name__)

MAX_SEGMENTS = 4  # decode_ops.c: row segments of different types in one linear
I64, PTR = ctypes.c_int64, ctypes.c_void_p


class Segment(ctypes.Structure):
    _fields_ = [("qtype", I64), ("int8_activations", I64), ("weight", PTR),
                ("row_bytes", I64), ("rows", I64)]


class Linear(ctypes.Structure):
    _fields_ = [("in_features", I64), ("out_features", I64), ("num_segments", I64),
                ("segments", Segment * MAX_SEGMENTS), ("bias", PTR)]


class Layer(ctypes.Structure):
    _fields_ = [("input_norm", PTR), ("post_norm", PTR), ("q_norm", PTR), ("k_norm", PTR),
                ("k_cache", PTR), ("v_cache", PTR), ("qkv", Linear), ("o", Linear),
                ("gate_up", Linear), ("down", Linear)]


class Dims(ctypes.Structure):
    _fields_ = [("hidden", I64), ("heads", I64), ("kv_heads", I64), ("head_dim", I64),
                ("rotary_dim", I64), ("intermediate", I64), ("num_slots", I64),
                ("max_positions", I64), ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                ("cos", PTR), ("sin", PTR)]


class Ineligible(Exception):
    """Why a shard's decode steps keep the torch modules (logged once at debug)."""


def _fp32(tensor: torch.Tensor | None, what: str) -> int:
    """The data pointer of a contiguous fp32 CPU tensor (0 for None)."""
    if tensor is None:
        return 0
    if tensor.dtype is not torch.float32 or not tensor.is_cpu or not tensor.is_contiguous():
        raise Ineligible(f"{what} is not a contiguous fp32 CPU tensor")
    return tensor.data_ptr()


def _linear(module: nn.Module, what: str) -> Linear:
    if not isinstance(module, PackedLinear):
        raise Ineligible(f"{what} is not packed")
    segments = module.native_segments()
    if segments is None or len(segments) > MAX_SEGMENTS:
        raise Ineligible(f"{what} has a segment the native kernels do not multiply")
    linear = Linear(module.in_features, module.out_features, len(segments))
    for i, (qtype, pointer, row_bytes, rows, int8) in enumerate(segments):
        linear.segments[i] = Segment(qtype, int(int8), pointer, row_bytes, rows)
    linear.bias = _fp32(module.bias, f"{what} bias")
    return linear


def _norm(module: nn.Module, what: str) -> tuple[int, float]:
    if type(module) is not RMSNorm:
        raise Ineligible(f"{what} is not an RMSNorm")
    return _fp32(module.weight.data, what), module.eps


def _layer(layer: nn.Module) -> tuple[Layer, float]:
    from parallax.models.llama import MLP, Attention, DecoderLayer

    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if type(layer).forward is not DecoderLayer.forward or type(mlp) is not MLP \
            or not isinstance(attention, Attention):
        raise Ineligible("its layers are not the plain decoder (Llama / Qwen2 / Qwen3 with a "
                         "SiLU-gated MLP)")
    if type(attention).forward is not Attention.forward or attention.sliding_window is not None \
            or attention.sinks is not None:
        raise Ineligible(f"layer {attention.layer_index} has its own attention")
    q_norm = k_norm = 0
    if type(attention).project_qk is not Attention.project_qk:
        if not (isinstance(getattr(attention, "q_norm", None), RMSNorm)
                and isinstance(getattr(attention, "k_norm", None), RMSNorm)):
            raise Ineligible(f"layer {attention.layer_index} projects q/k its own way")
        q_norm, q_eps = _norm(attention.q_norm, "q_norm")
        k_norm, k_eps = _norm(attention.k_norm, "k_norm")
    input_norm, eps = _norm(layer.input_layernorm, "input_layernorm")
    post_norm, post_eps = _norm(layer.post_attention_layernorm, "post_attention_layernorm")
    if post_eps != eps or (q_norm and not q_eps == k_eps == eps):
        raise Ineligible("the norms of a layer use different eps")
    if attention.k_cache is None or attention.v_cache is None:
        raise Ineligible("the KV cache is not attached yet")
    return Layer(input_norm, post_norm, q_norm, k_norm,
                 _fp32(attention.k_cache, "k_cache"), _fp32(attention.v_cache, "v_cache"),
                 _linear(attention.qkv_proj, "qkv_proj"), _linear(attention.o_proj, "o_proj"),
                 _linear(mlp.gate_up_proj, "gate_up_proj"),
                 _linear(mlp.down_proj, "down_proj")), eps


class DecodePlan:
    """The shard's layers as C descriptors. It points into the modules' tensors and holds
    references to them; `key` says which caches and weights it was built for."""

    def __init__(self, model: nn.Module) -> None:
        lib = fused_ops._lib()
        if lib is None:
            raise Ineligible("no native kernels")
        if not hasattr(model, "layers") or not len(model.layers):
            raise Ineligible("the model has no decoder layers")
        if os.environ.get("PARALLAX_FUSED_DECODE", "1").strip().lower() in ("0", "off", "no"):
            raise Ineligible("PARALLAX_FUSED_DECODE=0")
        layers = list(model.layers)
        described = [_layer(layer) for layer in layers]
        first = layers[0].self_attn
        rotary = first.rotary
        if any(layer.self_attn.rotary is not rotary for layer in layers):
            raise Ineligible("layers rotate with different tables")
        self.layers = (Layer * len(layers))(*(layer for layer, _ in described))
        self.dims = Dims(
            model.config.hidden_size, first.num_heads, first.num_kv_heads, first.head_dim,
            rotary.rotary_dim, layers[0].mlp.gate_up_proj.out_features // 2,
            first.k_cache.shape[0], rotary.cos.shape[0], described[0][1], first.scale,
            _fp32(rotary.cos, "rope cos"), _fp32(rotary.sin, "rope sin"))
        if any(layer.self_attn.k_cache.shape != first.k_cache.shape for layer in layers) \
                or any(eps != described[0][1] for _, eps in described):
            raise Ineligible("layers differ in cache size or norm eps")
        self._lib = lib
        # the weights stay alive while the plan points into them (their ids key it); the KV
        # caches do not: an engine's caches must go with it (checked through weak references)
        self._keep = [rotary.cos, rotary.sin] + list(model.parameters()) + list(model.buffers())

    def run(self, hidden: torch.Tensor, positions: torch.Tensor,
            meta: AttentionMetadata) -> torch.Tensor:
        """hidden [B, hidden] fp32 after the shard's layers (a new tensor)."""
        hidden = hidden.contiguous().clone()  # the C loop writes in place
        table, lens = meta.decode_slot_table, meta.decode_context_lens
        status = self._lib.decode_layers(
            ctypes.byref(self.dims), self.layers, len(self.layers), hidden.data_ptr(),
            hidden.shape[0], positions.data_ptr(), meta.slot_mapping.data_ptr(),
            table.data_ptr(), table.shape[1], lens.data_ptr(), torch.get_num_threads())
        if status != 0:
            raise ValueError("native decode step refused its arguments (a position, cache slot "
                             "or context length out of range)" if status == -1 else
                             "native decode step could not allocate its scratch buffer")
        return hidden


def decode_step_path(model: nn.Module) -> str:
    """How the shard's pure decode steps run, for the node's log and /health (call it once the
    engine has attached the KV cache)."""
    try:
        plan = DecodePlan(model)
    except Ineligible as exc:
        return f"torch modules ({exc})"
    return f"one native call per step (native-{plan._lib.variant})"


def plan_key(model: nn.Module) -> tuple:
    """What a plan depends on besides the KV caches: the first weight's buffer (.to() moves it;
    the plan keeps the old one alive, so its id stays unique), int8 activations, the native
    library and PARALLAX_FUSED_DECODE."""
    qkv = getattr(getattr(model.layers[0], "self_attn", None), "qkv_proj", None)
    return (id(getattr(qkv, "packed_0", None)), getattr(qkv, "activation_int8", None),
            id(fused_ops._lib()), os.environ.get("PARALLAX_FUSED_DECODE", "1"))


def _caches(model: nn.Module) -> list[torch.Tensor | None]:
    return [getattr(getattr(layer, "self_attn", None), name, None)
            for layer in model.layers for name in ("k_cache", "v_cache")]


def _weak(tensor: torch.Tensor | None):
    return (lambda: None) if tensor is None else weakref.ref(tensor)


# model.__dict__ entry: (DecodePlan or False, plan_key, weak references to the KV caches)
_BUILT = "_decode_plan_built"


def decode_plan_for(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttentionMetadata) -> DecodePlan | None:
    """The model's plan when this step can use it (a pure decode step of fewer than
    packed.GEMM_MIN_ROWS rows where the library has no blocked GEMM, fp32 on the CPU, int64
    metadata), else None."""
    rows = hidden.shape[0]
    if rows >= GEMM_MIN_ROWS:
        lib = fused_ops._lib()
        if lib is None or not lib.blocked_gemm:
            return None
    if (meta.num_decode_tokens != rows or meta.prefills
            or meta.by_window is not None or meta.window_decode is not None
            or hidden.dtype is not torch.float32 or not hidden.is_cpu
            or positions.dtype is not torch.long or meta.slot_mapping.dtype is not torch.long
            or meta.decode_slot_table.dtype is not torch.long
            or meta.decode_context_lens.dtype is not torch.long
            or not meta.decode_slot_table.is_contiguous() or not positions.is_contiguous()):
        return None
    key, caches = plan_key(model), _caches(model)
    built = model.__dict__.get(_BUILT)
    if built is not None and built[1] == key and len(built[2]) == len(caches) and \
            all(ref() is cache for ref, cache in zip(built[2], caches, strict=True)):
        return built[0] or None
    try:
        plan = DecodePlan(model)
        logger.info("decode steps of layers [%d, %d) run as one native call",
                    model.start_layer, model.end_layer)
    except Ineligible as exc:
        logger.debug("decode steps use the torch modules: %s", exc)
        plan = False
    model.__dict__[_BUILT] = (plan, key, [_weak(cache) for cache in caches])
    return plan or None


def current_plan(model: nn.Module) -> DecodePlan | bool | None:
    """The plan the model's last pure decode step looked up: a DecodePlan, False (the torch
    modules: ineligible), or None before any."""
    built = model.__dict__.get(_BUILT)
    return None if built is None else built[0]
